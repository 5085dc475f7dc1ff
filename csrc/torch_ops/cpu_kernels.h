// Fused Shuffle Attention CPU kernels: forward and backward, vectorised with at::vec and
// parallel over planes with at::parallel_for.
//
// Compiled once per CPU capability (cpu_module_*.cpp; setup.py gives each its ISA flags)
// and loaded for the capability torch itself runs with. The maths is csrc/plane_math.h.
//
// Determinism: every plane's statistics and sums are computed by one task in a fixed
// order that depends on the vector width alone, and the parameter gradients are a serial
// sum over (batch, group), so results are bitwise identical whatever the thread count.
//
// Paths:
//  * planes (NCHW, and any layout whose H x W planes are contiguous runs): one task per
//    plane; one pass for the statistics (sums about the plane's first value; a second about
//    the estimated mean where the first value lies far from it), one for the gated output,
//    all over a plane that stays in cache between them. Backward: one pass for the plane sums
//    (keeping the gate in a scratch row), one for dx.
//  * channels_last: a task owns one vector of channel pairs (j, C/2 + j) of one image,
//    vectorised along channels, whose outputs 2j, 2j + 1 are adjacent (interleaved
//    stores); two passes over its slice of the image (H x W x 2 vectors), as for planes.
//  * anything else (sliced, permuted, expanded gradients, mixed layouts): the plane path
//    on planes gathered into (and scattered from) a contiguous row.
//
// The small helpers and lambdas called once per vector are marked always-inline
// (C10_ALWAYS_INLINE, C10_ALWAYS_INLINE_ATTRIBUTE): in these large template instantiations
// GCC otherwise called some of them out of line, passing every vector through memory.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include "plane_math.h"
#include "torch_ops/cache_size.h"
#include "torch_ops/cpu_vec.h"
#include "torch_ops/op_checks.h"

namespace sa_kernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

using plane_math::Gate;
using plane_math::Params;

// Work per parallel task: enough that threading pays for itself on small inputs.
constexpr int64_t kGrainElements = 32768;
// The channels-last backward keeps a vector's gates between its passes up to this size.
constexpr int64_t kMaxKeptGateBytes = 4 * 1024 * 1024;

// Planes are taken a block at a time: the statistics of all of them, then their gates,
// then their outputs. Small planes (7x7, 14x14) are dominated by the per-plane scalar work
// (reductions, division, square root, exp), which overlaps across a block's planes this
// way; the block stays in cache from the first pass to the last.
constexpr int64_t kBlockBytes = 64 * 1024;
constexpr int64_t kMaxBlockPlanes = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Geometry {
  int64_t batch, channels, height, width;
  int64_t hw() const { return height * width; }
};

struct Strides {
  int64_t b, c, h, w;
};

inline Geometry geometry_of(const at::Tensor& t) {
  return {t.size(0), t.size(1), t.size(2), t.size(3)};
}

inline Strides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Every (b, c) plane is one contiguous run of H * W elements.
inline bool planes_contiguous(const Strides& s, const Geometry& g) {
  return (g.width == 1 || s.w == 1) && (g.height == 1 || s.h == g.width);
}

// Element (b, c, h, w) at ((b * H + h) * W + w) * C + c (size-1 dimensions ignored).
inline bool channels_last(const Strides& s, const Geometry& g) {
  const int64_t sizes[4] = {g.channels, g.width, g.height, g.batch};
  const int64_t strides[4] = {s.c, s.w, s.h, s.b};
  int64_t expected = 1;
  for (int d = 0; d < 4; ++d) {
    if (sizes[d] == 1) continue;
    if (strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return true;
}

// The six parameters converted to the accumulation type, in one buffer.
template <typename A>
class ParamTable {
 public:
  explicit ParamTable(const checks::ParamRefs& params) {
    half_ = params[0]->numel();
    values_.resize(6 * half_);
    for (int i = 0; i < 6; ++i) {
      const at::Tensor p = params[i]->contiguous();
      A* dst = values_.data() + i * half_;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "sa_params", [&] {
        const scalar_t* src = p.const_data_ptr<scalar_t>();
        for (int64_t k = 0; k < half_; ++k) dst[k] = static_cast<A>(src[k]);
      });
    }
  }

  Params<A> params() const {
    const A* v = values_.data();
    return {v, v + half_, v + 2 * half_, v + 3 * half_, v + 4 * half_, v + 5 * half_, half_};
  }

 private:
  int64_t half_;
  std::vector<A> values_;
};

// ---- a plane in row-major order: in place, or gathered into a contiguous row ----------

// The planes of one tensor, read and written in row-major order: in place where every plane
// is a contiguous run, else through a row buffer. Whether it is, is decided once per tensor.
template <typename T>
class PlaneAccess {
 public:
  PlaneAccess(const Strides& s, const Geometry& g) : s_(s), g_(g), in_place_(planes_contiguous(s, g)) {}

  bool in_place() const { return in_place_; }

  const T* read(const T* plane, T* row) const {
    if (in_place_) return plane;
    for (int64_t h = 0; h < g_.height; ++h) {
      for (int64_t w = 0; w < g_.width; ++w) row[h * g_.width + w] = plane[h * s_.h + w * s_.w];
    }
    return row;
  }

  // Where to write the plane; finish() then moves it into place if that was the row.
  T* target(T* plane, T* row) const { return in_place_ ? plane : row; }

  void finish(T* plane, const T* row) const {
    if (in_place_) return;
    for (int64_t h = 0; h < g_.height; ++h) {
      for (int64_t w = 0; w < g_.width; ++w) plane[h * s_.h + w * s_.w] = row[h * g_.width + w];
    }
  }

 private:
  Strides s_;
  Geometry g_;
  bool in_place_;
};

// (batch, channel, index within the group) of a block's consecutive planes, found with
// one division per block (an integer division per plane costs as much as a small plane's
// arithmetic).
struct BlockPlanes {
  int64_t b[kMaxBlockPlanes], c[kMaxBlockPlanes], k[kMaxBlockPlanes];

  BlockPlanes(int64_t first, int64_t count, int64_t channels, int64_t group_size) {
    int64_t bb = first / channels, cc = first % channels, kk = cc % group_size;
    for (int64_t i = 0; i < count; ++i) {
      b[i] = bb;
      c[i] = cc;
      k[i] = kk;
      if (++kk == group_size) kk = 0;
      if (++cc == channels) {
        cc = kk = 0;
        ++bb;
      }
    }
  }
};

// The gates of a block's planes; the constant gates' sigmoids taken as vectors, not one
// scalar exp per plane.
template <typename A>
struct BlockGates {
  Gate<A> gate[kMaxBlockPlanes];
  alignas(64) A constant[kMaxBlockPlanes];  // sigmoid(beta) of channel-branch planes

  // mean[i], rstd[i]: plane i's statistics.
  BlockGates(const Params<A>& params, const BlockPlanes& where, int64_t count, const A* mean, const A* rstd) {
    using V = at::vec::Vectorized<A>;
    constexpr int64_t N = V::size();
    for (int64_t i = 0; i < count; ++i) {
      gate[i] = plane_math::gate_in_group<A>(params, where.k[i], mean[i], rstd[i]);
      constant[i] = gate[i].spatial ? A(0) : gate[i].beta;
    }
    for (int64_t i = 0; i < count; i += N) {
      vec_sigmoid(V::loadu(constant + i, int(std::min(N, count - i)))).store(constant + i, int(std::min(N, count - i)));
    }
  }
};

// ---- plane kernels -----------------------------------------------------------------

// `count` (<= kSize) elements; lanes past them are zero.
template <typename T>
inline typename Lanes<T>::V load_count(const T* p, int64_t count) {
  return count == Lanes<T>::kSize ? Lanes<T>::load(p) : Lanes<T>::load(p, count);
}


// v where finite, else 0 (a shift for moments that keeps an infinity's sums infinite).
template <typename V>
C10_ALWAYS_INLINE V finite_or_zero(const V& v) {
  return V::blendv(V(0), v, (v - v) == V(0));
}

// A plane's statistics are sums of d = x - c and d^2 about a value c of the plane: its first
// value (0 if that is not finite, so that an infinity gives the infinite mean the reference
// computes), which keeps a constant plane's d exactly 0 (a plain sum / N need not give the
// value back: alpha = 316 x scale at variance 0). Then mean = c + e with e = sum(d) / N, and
// var = sum(d^2) / N - e^2, which loses to cancellation about log2(1 + e^2 / var) bits. Where
// the first value lies more than 4 standard deviations from the mean (e^2 > kRecentre * var: a
// ReLU map with one hot corner pixel), the plane takes a second pass, about c + e. Rarely: a
// second pass on every plane took the forward 0.93 to 1.67 times as long (one thread, the CPU
// benchmark shapes, normal data), and from 2 standard deviations the channels-last forward 1.05
// to 1.39 times (any of a vector's 16 lanes calls for the pass).
constexpr float kRecentre = 16;

// The plane's first value, or 0 if that is not finite.
template <typename A>
C10_ALWAYS_INLINE A first_value_shift(A first) {
  return std::isfinite(first) ? first : A(0);
}

// Whether a plane's sums about c (as plane_sums_about gives them) call for a second pass.
template <typename A>
C10_ALWAYS_INLINE bool needs_recentring(A sum1, A sum2, int64_t n) {
  const A e = sum1 / A(n);
  return e * e > A(kRecentre) * (sum2 / A(n) - e * e);
}

// The sums of d = x - c and of d^2 over a plane of n elements, in vector chains: whole
// vectors four chains by turns, then up to three more whole vectors, one per chain (small
// planes have no other work to overlap a chain's latency with), then the tail, its lanes past
// the end zeroed, in the fourth chain.
template <typename T>
std::pair<acc_t<T>, acc_t<T>> plane_sums_about(const T* x, int64_t n, acc_t<T> c) {
  using L = Lanes<T>;
  using V = typename L::V;
  using A = acc_t<T>;
  constexpr int64_t N = L::kSize;
  constexpr int kUnroll = 4;
  const V vc(c);
  V s1[kUnroll], s2[kUnroll];
  for (int u = 0; u < kUnroll; ++u) s1[u] = s2[u] = V(A(0));
  auto add = [&](int u, const V& d) C10_ALWAYS_INLINE_ATTRIBUTE {
    s1[u] += d;
    s2[u] = at::vec::fmadd(d, d, s2[u]);
  };
  int64_t i = 0;
  for (; i + kUnroll * N <= n; i += kUnroll * N) {
    for (int u = 0; u < kUnroll; ++u) add(u, L::load(x + i + u * N) - vc);
  }
  const int64_t rest = (n - i) / N;
  if (rest > 0) add(0, L::load(x + i) - vc);
  if (rest > 1) add(1, L::load(x + i + N) - vc);
  if (rest > 2) add(2, L::load(x + i + 2 * N) - vc);
  i += rest * N;
  if (i < n) add(3, first_lanes(L::load(x + i, n - i) - vc, n - i));
  const V t1 = (s1[0] + s1[1]) + (s1[2] + s1[3]);
  const V t2 = (s2[0] + s2[1]) + (s2[2] + s2[3]);
  return {lane_sum(t1), lane_sum(t2)};
}

// Calls f(offset, count) for every vector of a plane of n elements (count < kSize at the end).
template <typename T, typename F>
inline void for_each_vector(int64_t n, F&& f) {
  constexpr int64_t N = Lanes<T>::kSize;
  int64_t i = 0;
  for (; i + N <= n; i += N) f(i, N);
  if (i < n) f(i, n - i);
}

// `constant`: sigmoid(beta), the gate of a channel-branch plane.
template <typename T>
void gate_plane(const T* x, T* out, int64_t n, acc_t<T> mean, const Gate<acc_t<T>>& g, acc_t<T> constant,
                const OutputStores<T>& put) {
  using L = Lanes<T>;
  using V = typename L::V;
  if (!g.spatial) {
    const V s(constant);
    for_each_vector<T>(n, [&](int64_t i, int64_t k) { put(out + i, load_count(x + i, k) * s, k); });
    return;
  }
  const V a(g.alpha), b(g.beta), m(mean);
  for_each_vector<T>(n, [&](int64_t i, int64_t k) {
    const V v = load_count(x + i, k);
    put(out + i, v * vec_sigmoid(at::vec::fmadd(a, v - m, b)), k);
  });
}

// Backward of one plane, in two passes. The first returns S1 and S2 (as plane_math.h
// defines them) and keeps the gate of spatial planes in `scratch` (n values); the second
// writes dx from them.
template <typename T>
std::pair<acc_t<T>, acc_t<T>> backward_plane_sums(const T* x, const T* dy, int64_t n,
                                                  acc_t<T> mean, acc_t<T> rstd,
                                                  const Gate<acc_t<T>>& g, acc_t<T> constant,
                                                  acc_t<T>* scratch) {
  using V = typename Lanes<T>::V;
  using A = acc_t<T>;
  if (!g.spatial) {  // a constant gate s: S1 = s (1 - s) sum(dy * x)
    const A s = constant;
    V acc(A(0));
    for_each_vector<T>(n, [&](int64_t i, int64_t k) { acc = at::vec::fmadd(load_count(dy + i, k), load_count(x + i, k), acc); });
    return {s * (A(1) - s) * lane_sum(acc), A(0)};
  }
  const V one(A(1)), a(g.alpha), b(g.beta), m(mean);
  V acc1(A(0)), acc2(A(0));
  for_each_vector<T>(n, [&](int64_t i, int64_t k) {
    const V v = load_count(x + i, k), d = load_count(dy + i, k);  // zero lanes past the end add nothing
    const V xc = v - m;
    const V s = vec_sigmoid(at::vec::fmadd(a, xc, b));
    s.store(scratch + i, int(k));
    const V dt = d * v * s * (one - s);
    acc1 += dt;
    acc2 = at::vec::fmadd(dt, xc, acc2);
  });
  return {lane_sum(acc1), lane_sum(acc2) * rstd};
}

template <typename T>
void backward_plane_dx(const T* x, const T* dy, T* dx, int64_t n, acc_t<T> mean,
                       const Gate<acc_t<T>>& g, acc_t<T> constant,
                       const plane_math::GradCoefficients<acc_t<T>>& coef, const acc_t<T>* scratch,
                       const OutputStores<T>& put) {
  using L = Lanes<T>;
  using V = typename L::V;
  using A = acc_t<T>;
  const V k0(coef.k0);
  if (!g.spatial) {  // dx = dy * s + k0
    const V vs(constant);
    for_each_vector<T>(n, [&](int64_t i, int64_t c) { put(dx + i, at::vec::fmadd(load_count(dy + i, c), vs, k0), c); });
    return;
  }
  const V one(A(1)), a(g.alpha), m(mean), k1(coef.k1);
  for_each_vector<T>(n, [&](int64_t i, int64_t k) {
    const V v = load_count(x + i, k), d = load_count(dy + i, k);
    const V s = V::loadu(scratch + i, k);
    const V xc = v - m;
    const V dt = d * v * s * (one - s);
    put(dx + i, at::vec::fmadd(d, s, at::vec::fmadd(a, dt, at::vec::fmadd(k1, xc, k0))), k);
  });
}

// ---- forward -----------------------------------------------------------------------

template <typename T>
struct ForwardArgs {
  using A = acc_t<T>;
  const T* x;
  Strides xs;
  T* out;
  Strides os;
  A* mean;  // (B, C) contiguous
  A* rstd;
  Params<A> params;
  Geometry geo;
  double eps;
  OutputStores<T> stores;
};


inline int64_t planes_per_block(int64_t n, int64_t element_bytes) {
  return std::min(kMaxBlockPlanes, std::max<int64_t>(1, kBlockBytes / (n * element_bytes)));
}

// Splits the planes into blocks of `per_block` and the blocks among threads: calls
// chunk(first_plane, end_plane) once per thread's share, a whole number of blocks.
template <typename F>
void parallel_over_blocks(const Geometry& g, int64_t per_block, F&& chunk) {
  const int64_t total = g.batch * g.channels;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (g.hw() * per_block));
  at::parallel_for(0, ceil_div(total, per_block), grain, [&](int64_t begin, int64_t end) {
    chunk(begin * per_block, std::min(end * per_block, total));
  });
}

// Mean and rstd of `count` planes from the value c each plane's sums were taken about and the
// sums of d = x - c and d^2 (plane_sums_about), as vectors: where planes are small, their
// scalar divisions and square roots cost as much as the plane's own arithmetic. var < 0
// (rounding) is taken as 0; a NaN var (an infinity in the plane: inf - inf) stays NaN, so a
// spatial plane's output is NaN as GroupNorm's is, and an infinite mean stays infinite, as
// the reference's pooling gives it.
template <typename A>
void block_moments(const A* c, const A* sum1, const A* sum2, int64_t count, int64_t n, double eps,
                   A* mean, A* rstd) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t N = V::size();
  const V vn(static_cast<A>(n)), veps(static_cast<A>(eps)), zero(A(0)), one(A(1));
  for (int64_t i = 0; i < count; i += N) {
    const int lanes = int(std::min(N, count - i));
    const V ci = V::loadu(c + i, lanes), e = V::loadu(sum1 + i, lanes) / vn;
    const V v = V::loadu(sum2 + i, lanes) / vn - e * e;
    const V var = V::blendv(v, zero, v < zero);
    // An infinite c (the second pass about an infinite mean) makes e NaN: the mean stays c.
    (ci + V::blendv(zero, e, (ci - ci) == zero)).store(mean + i, lanes);
    (one / (var + veps).sqrt()).store(rstd + i, lanes);
  }
}

template <typename T>
void forward_planes(const ForwardArgs<T>& p) {
  using A = acc_t<T>;
  const Geometry& g = p.geo;
  const int64_t n = g.hw();
  const int64_t per_block = planes_per_block(n, sizeof(T));
  parallel_over_blocks(g, per_block, [&](int64_t begin, int64_t end) {
    const PlaneAccess<T> xa(p.xs, g), oa(p.os, g);
    // A row buffer is read straight back by finish(): only planes written in place stream.
    const OutputStores<T> put = oa.in_place() ? p.stores : OutputStores<T>{};
    std::vector<T> in_rows, out_rows;  // for planes that are not contiguous runs
    if (!xa.in_place()) in_rows.resize(per_block * n);
    if (!oa.in_place()) out_rows.resize(per_block * n);
    const T* x[kMaxBlockPlanes];
    alignas(64) A about[kMaxBlockPlanes], sum1[kMaxBlockPlanes], sum2[kMaxBlockPlanes];
    alignas(64) A mean[kMaxBlockPlanes], rstd[kMaxBlockPlanes];
    for (int64_t first = begin; first < end; first += per_block) {
      const int64_t count = std::min(per_block, end - first);
      const BlockPlanes where(first, count, g.channels, 2 * p.params.half);
      for (int64_t k = 0; k < count; ++k) {
        x[k] = xa.read(p.x + where.b[k] * p.xs.b + where.c[k] * p.xs.c, in_rows.data() + k * n);
        about[k] = first_value_shift(static_cast<A>(x[k][0]));
        std::tie(sum1[k], sum2[k]) = plane_sums_about(x[k], n, about[k]);
        if (C10_UNLIKELY(needs_recentring(sum1[k], sum2[k], n))) {
          about[k] += sum1[k] / A(n);
          std::tie(sum1[k], sum2[k]) = plane_sums_about(x[k], n, about[k]);
        }
      }
      block_moments(about, sum1, sum2, count, n, p.eps, mean, rstd);
      std::copy(mean, mean + count, p.mean + first);
      std::copy(rstd, rstd + count, p.rstd + first);
      const BlockGates<A> gates(p.params, where, count, mean, rstd);
      for (int64_t k = 0; k < count; ++k) {
        T* out_plane = p.out + where.b[k] * p.os.b + plane_math::output_channel(where.c[k], g.channels) * p.os.c;
        T* out = oa.target(out_plane, out_rows.data() + k * n);
        gate_plane(x[k], out, n, mean[k], gates.gate[k], gates.constant[k], put);
        oa.finish(out_plane, out);
      }
    }
    put.fence();
  });
}

// Stores y0 (channel 2j) and y1 (channel 2j + 1) of `count` pairs interleaved at `out`.
template <typename T>
C10_ALWAYS_INLINE void store_pairs(T* out, const typename Lanes<T>::V& y0, const typename Lanes<T>::V& y1,
                        int64_t count, const OutputStores<T>& put) {
  constexpr int64_t N = Lanes<T>::kSize;
  const auto lo_hi = at::vec::interleave2(y0, y1);
  put(out, std::get<0>(lo_hi), std::min(N, 2 * count));
  if (2 * count > N) put(out + N, std::get<1>(lo_hi), 2 * count - N);
}

// The gate values of a vector of channels, one lane each (lanes past the last channel: zero).
template <typename A>
struct LaneGates {
  static constexpr int kSize = at::vec::Vectorized<A>::size();
  A mean[kSize] = {}, alpha[kSize] = {}, beta[kSize] = {};
  bool spatial[kSize] = {};

  // k: the channel's index within its group.
  void set(int64_t lane, const Params<A>& params, int64_t k, A mean_, A rstd) {
    const auto gate = plane_math::gate_in_group<A>(params, k, mean_, rstd);
    mean[lane] = mean_;
    alpha[lane] = gate.alpha;
    beta[lane] = gate.beta;
    spatial[lane] = gate.spatial;
  }

  bool any_spatial() const { return std::any_of(spatial, spatial + kSize, [](bool b) { return b; }); }
};

// The gates of a channels-last pair vector: the same channel offset in both halves (h = 0:
// channels j, h = 1: channels C/2 + j), whose outputs are adjacent. A vector of
// channel-branch planes only has constant gates, sigmoid(beta): no exp per element. Where
// both vectors mix the branches (G = 64 alternates them every 2 to 16 channels), their
// spatial lanes are packed into one vector for a single sigmoid.
template <typename V>
class PairGates {
 public:
  using A = typename V::value_type;
  V mean[2], alpha[2];

  PairGates() = default;
  PairGates(const LaneGates<A>& h0, const LaneGates<A>& h1) {
    const LaneGates<A>* lanes[2] = {&h0, &h1};
    for (int h = 0; h < 2; ++h) {
      mean[h] = V::loadu(lanes[h]->mean);
      alpha[h] = V::loadu(lanes[h]->alpha);
      beta_[h] = V::loadu(lanes[h]->beta);
      constant_[h] = vec_sigmoid(beta_[h]);
      any_spatial_[h] = lanes[h]->any_spatial();
      A bits[V::size()];
      for (int l = 0; l < V::size(); ++l) std::memset(&bits[l], lanes[h]->spatial[l] ? 0xFF : 0, sizeof(A));
      spatial_bits_[h] = V::loadu(bits);
    }
    if (any_spatial_[0] && any_spatial_[1]) {  // else one sigmoid at most already
      packer_ = LanePacker<V>(h0.spatial, h1.spatial);
      packed_ = packer_.packable();
    }
  }

  // Calls body(gate) once, where gate(xc, s) sets s[h] = sigmoid(alpha (x - mean) + beta)
  // given xc[h] = x - mean: a closure of its own for each mix of branches, so that the
  // caller's loop over positions (inside body) carries no branch on the mix.
  template <typename Body>
  void with_gates(Body&& body) const {
    // Packing takes the spatial lanes alone. Unpacked, the constant lanes go through the
    // sigmoid too, as sigmoid(0 * xc + beta) = sigmoid(beta): xc is zeroed there first, since
    // 0 * xc is NaN where xc is infinite (a plane with an infinity has an infinite mean).
    auto z_packed = [this](const V (&xc)[2], int h) C10_ALWAYS_INLINE_ATTRIBUTE { return at::vec::fmadd(alpha[h], xc[h], beta_[h]); };
    auto z = [this](const V (&xc)[2], int h) C10_ALWAYS_INLINE_ATTRIBUTE { return at::vec::fmadd(alpha[h], xc[h] & spatial_bits_[h], beta_[h]); };
    if (packed_) {
      body([&](const V (&xc)[2], V (&s)[2]) C10_ALWAYS_INLINE_ATTRIBUTE {
        packer_.unpack(vec_sigmoid(packer_.pack(z_packed(xc, 0), z_packed(xc, 1))), constant_[0], constant_[1], s[0], s[1]);
      });
    } else if (any_spatial_[0] && any_spatial_[1]) {
      body([&](const V (&xc)[2], V (&s)[2]) C10_ALWAYS_INLINE_ATTRIBUTE {
        s[0] = vec_sigmoid(z(xc, 0));
        s[1] = vec_sigmoid(z(xc, 1));
      });
    } else if (any_spatial_[0]) {
      body([&](const V (&xc)[2], V (&s)[2]) C10_ALWAYS_INLINE_ATTRIBUTE {
        s[0] = vec_sigmoid(z(xc, 0));
        s[1] = constant_[1];
      });
    } else if (any_spatial_[1]) {
      body([&](const V (&xc)[2], V (&s)[2]) C10_ALWAYS_INLINE_ATTRIBUTE {
        s[0] = constant_[0];
        s[1] = vec_sigmoid(z(xc, 1));
      });
    } else {
      body([&](const V (&)[2], V (&s)[2]) C10_ALWAYS_INLINE_ATTRIBUTE {
        s[0] = constant_[0];
        s[1] = constant_[1];
      });
    }
  }

 private:
  V beta_[2], constant_[2];
  V spatial_bits_[2];  // all bits set in spatial lanes, clear in constant ones
  bool any_spatial_[2] = {true, true};
  bool packed_ = false;
  LanePacker<V> packer_;
};

// Runs task(b, c, count, scratch) for each vector of channel pairs of each image, in
// parallel: image b's channels c[0] + l (first half) and c[1] + l (second half), l < count.
// A task owns its channels' statistics whole, so no merge across threads is needed. Each
// parallel chunk gets its own `scratch` of scratch_size (uninitialised) accumulation-type
// values, owned by the chunk rather than indexed by thread number.
template <typename T, typename Task>
void parallel_over_pair_vectors(const Geometry& g, int64_t scratch_size, const Task& task) {
  constexpr int64_t N = Lanes<T>::kSize;
  const int64_t half_c = g.channels / 2;
  const int64_t per_image = ceil_div(half_c, N);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (g.hw() * 2 * N));
  at::parallel_for(0, g.batch * per_image, grain, [&](int64_t begin, int64_t end) {
    const std::unique_ptr<acc_t<T>[]> scratch(scratch_size > 0 ? new acc_t<T>[scratch_size] : nullptr);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j = (t % per_image) * N;
      const int64_t c[2] = {j, half_c + j};
      task(t / per_image, c, std::min(N, half_c - j), scratch.get());
    }
  });
}

// A channels-last pass reads a vector (one or two cache lines) per half from each position,
// rows of C channels apart: a stride the hardware prefetchers follow too late when the
// image is not in cache. The first pass asks for its rows this many positions ahead.
constexpr int64_t kPrefetchRows = 16;

template <typename T>
inline void prefetch_pair(const T* row, const int64_t (&c)[2]) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  for (int h = 0; h < 2; ++h) _mm_prefetch(reinterpret_cast<const char*>(row + c[h]), _MM_HINT_T0);
#endif
}

// One load of a channels-last vector: all kSize lanes (kFull, known at compile time) or
// the first `count`.
template <typename T, bool kFull>
inline typename Lanes<T>::V load_lanes(const T* p, int64_t count) {
  if constexpr (kFull) {
    return Lanes<T>::load(p);
  } else {
    return load_count(p, count);
  }
}

// Calls f(l, k) for the channels first + l, l < count, k the channel's index within its
// group of group_size: one division, not one per lane (a 64-bit division per lane cost as
// much as the rest of a channels-last vector's setup on small planes).
template <typename F>
C10_ALWAYS_INLINE void for_each_group_index(int64_t first, int64_t count, int64_t group_size, F&& f) {
  for (int64_t l = 0, k = first % group_size; l < count; ++l) {
    f(l, k);
    if (++k == group_size) k = 0;
  }
}

// The lane gates of one channels-last vector of pairs of image b (lanes: channels c[h] + l,
// l < count, of half h) from their statistics.
template <typename A>
void pair_lane_gates(const Params<A>& params, const A* mean, const A* rstd, const int64_t (&c)[2],
                     int64_t count, LaneGates<A> (&lanes)[2]) {
  for (int h = 0; h < 2; ++h) {
    for_each_group_index(c[h], count, 2 * params.half, [&](int64_t l, int64_t k) {
      lanes[h].set(l, params, k, mean[c[h] + l], rstd[c[h] + l]);
    });
  }
}

template <typename A>
PairGates<at::vec::Vectorized<A>> pair_gates(const Params<A>& params, const A* mean, const A* rstd,
                                             const int64_t (&c)[2], int64_t count) {
  LaneGates<A> lanes[2];
  pair_lane_gates(params, mean, rstd, c, count, lanes);
  return PairGates<at::vec::Vectorized<A>>(lanes[0], lanes[1]);
}

#if defined(CPU_CAPABILITY_AVX512)
// Where the 2 x 16 lanes (half 0, then half 1) of one channels-last vector of pairs go in
// the forward on AVX-512 float (two-operand lane permutes in one instruction): "work order"
// puts the spatial-branch lanes first, then the channel-branch ones, and the outputs take
// each pair's two values to channels 2j, 2j + 1. It depends on the channels only, so a
// call builds it once per vector position j rather than once per image.
struct PairLayout {
  static constexpr int kSize = 16;
  __m512i source[2], target[2];  // work lane <- input lane; output lane <- work lane
  __mmask16 spatial[2] = {0, 0};
  bool permute = false;

  PairLayout(int64_t half, const int64_t (&c)[2], int64_t count) {
    int32_t from[2 * kSize] = {}, where[2 * kSize] = {}, to[2 * kSize];
    int g = 0;
    for (const bool spatial_first : {true, false}) {
      for (int h = 0; h < 2; ++h) {
        for_each_group_index(c[h], count, 2 * half, [&](int64_t l, int64_t k) {
          if ((k >= half) != spatial_first) return;
          const int lane = h * kSize + int(l);
          permute = permute || lane != g;
          where[lane] = g;
          from[g] = lane;
          if (spatial_first) spatial[g / kSize] |= __mmask16(1u << (g % kSize));
          ++g;
        });
      }
    }
    for (int o = 0; o < 2 * kSize; ++o) to[o] = where[(o % 2) * kSize + o / 2];
    for (int k = 0; k < 2; ++k) {
      source[k] = _mm512_loadu_si512(from + k * kSize);
      target[k] = _mm512_loadu_si512(to + k * kSize);
    }
  }
};

// The forward's channels-last outputs of one vector of pairs in PairLayout's work order.
// Gating runs on the two work vectors, a sigmoid only on those with spatial lanes (at G =
// 64 with half <= 8, one: the first work vector all spatial, the second all constant),
// then one permute per output vector. Where the branches mix, that is 4 permutes where
// packing for the sigmoid, unpacking and interleaving took 6, and x - mean, the gate and
// the product once per work vector rather than once per half. Per lane the arithmetic is
// PairGates's (x - mean, fmadd, sigmoid, product; the constant gate sigmoid(beta) taken as
// a vector), so for finite x - mean the outputs are bit for bit the same. Constant lanes
// never go through the sigmoid here (PairGates's unpacked vectors took sigmoid(0 * xc +
// beta), NaN for an infinite xc): x * sigmoid(beta), as on the plane path.
class PairOutputs {
 public:
  using V = at::vec::Vectorized<float>;

  PairOutputs(const PairLayout& layout, const LaneGates<float> (&lanes)[2]) : layout_(layout) {
    auto work = [this](const float* h0, const float* h1, V (&out)[2]) {
      const V in[2] = {V::loadu(h0), V::loadu(h1)};
      for (int k = 0; k < 2; ++k) {
        out[k] = layout_.permute ? V(_mm512_permutex2var_ps(in[0], layout_.source[k], in[1])) : in[k];
      }
    };
    work(lanes[0].mean, lanes[1].mean, mean_);
    work(lanes[0].alpha, lanes[1].alpha, alpha_);
    work(lanes[0].beta, lanes[1].beta, beta_);
    for (int k = 0; k < 2; ++k) constant_[k] = vec_sigmoid(beta_[k]);
  }

  // Calls body(apply) once, where apply(x0, x1, y0, y1) sets the output vectors y0, y1
  // (channels 2j, 2j + 1 interleaved) from the input vectors x0, x1 (halves 0 and 1): a
  // closure per case, so the caller's loop over positions carries no branch.
  template <typename Body>
  void with_outputs(Body&& body) const {
    if (layout_.permute) {
      with_kinds<true>(body);
    } else {
      with_kinds<false>(body);
    }
  }

 private:
  // How a work vector is gated: all lanes constant, all spatial, or a blend of the two.
  enum Kind { kConstant, kSpatial, kBlend };

  Kind kind(int k) const {
    const __mmask16 m = layout_.spatial[k];
    return m == 0 ? kConstant : m == __mmask16(0xFFFF) ? kSpatial : kBlend;
  }

  // Spatial lanes come first, so the second work vector is gated only when the first is
  // all spatial.
  template <bool kPermute, typename Body>
  void with_kinds(Body& body) const {
    switch (kind(0)) {
      case kConstant:
        return body(closure<kPermute, kConstant, kConstant>());
      case kBlend:
        return body(closure<kPermute, kBlend, kConstant>());
      case kSpatial:
        switch (kind(1)) {
          case kConstant:
            return body(closure<kPermute, kSpatial, kConstant>());
          case kBlend:
            return body(closure<kPermute, kSpatial, kBlend>());
          case kSpatial:
            return body(closure<kPermute, kSpatial, kSpatial>());
        }
    }
  }

  template <bool kPermute, Kind kKind0, Kind kKind1>
  auto closure() const {
    return [this](const V& x0, const V& x1, V& y0, V& y1) C10_ALWAYS_INLINE_ATTRIBUTE {
      const V w[2] = {kPermute ? V(_mm512_permutex2var_ps(x0, layout_.source[0], x1)) : x0,
                      kPermute ? V(_mm512_permutex2var_ps(x0, layout_.source[1], x1)) : x1};
      const V y[2] = {w[0] * gate<kKind0>(w[0], 0), w[1] * gate<kKind1>(w[1], 1)};
      y0 = _mm512_permutex2var_ps(y[0], layout_.target[0], y[1]);
      y1 = _mm512_permutex2var_ps(y[0], layout_.target[1], y[1]);
    };
  }

  template <Kind kKind>
  C10_ALWAYS_INLINE V gate(const V& w, int k) const {
    if constexpr (kKind == kConstant) {
      return constant_[k];
    } else {
      const V s = vec_sigmoid(at::vec::fmadd(alpha_[k], w - mean_[k], beta_[k]));
      if constexpr (kKind == kSpatial) return s;
      return _mm512_mask_blend_ps(layout_.spatial[k], constant_[k], s);
    }
  }

  const PairLayout layout_;  // a copy: kept in registers through the caller's loop
  V mean_[2], alpha_[2], beta_[2], constant_[2];
};

using PairLayouts = std::vector<PairLayout>;  // one per vector of pairs of an image
#else
struct PairLayouts {};  // no work order without two-operand permutes
#endif

// Statistics, then gated output, of one vector of channel pairs (j, C/2 + j) of image b:
// channels c[h] + l (l < count) of half h. The vector's slice of the image, read in both
// passes (H * W x 2 vectors: 400 KB of float at 56 x 56), stays in the core's cache between
// them up to planes of about that size; each loop over positions keeps its
// accumulators and gates in registers.
template <typename T, bool kFull>
void forward_pair_vector(const ForwardArgs<T>& p, int64_t b, const int64_t (&channels)[2], int64_t count,
                         [[maybe_unused]] const PairLayouts& layouts) {
  using V = typename Lanes<T>::V;
  using A = acc_t<T>;
  constexpr int64_t N = Lanes<T>::kSize;
  // Local copies, kept in registers: through references they were reloaded after every
  // vector store (the intrinsics' store types may alias anything).
  const int64_t c[2] = {channels[0], channels[1]};
  const OutputStores<T> put = p.stores;
  const int64_t C = p.geo.channels, n = p.geo.hw();
  const T* x = p.x + b * p.xs.b;
  auto load = [count](const T* q) C10_ALWAYS_INLINE_ATTRIBUTE { return load_lanes<T, kFull>(q, count); };

  // Statistics per channel lane, as plane_sums_about takes them: sums about each lane's first
  // value, and a second pass about the estimated mean where a lane calls for it. Even and odd
  // positions in order, then added (two chains per sum: a lone chain of dependent adds bounds
  // the loop on small planes), a block of kSumBlock positions at a time, the block sums then
  // added in order (with one running sum per lane and parity, a large value early in the
  // plane rounded every later addition at its own magnitude). Named accumulators, not arrays:
  // GCC kept an array's element in memory, a store-to-load chain per position.
  constexpr int64_t kSumBlock = 64;
  auto sums_about = [&](const V (&about)[2]) C10_ALWAYS_INLINE_ATTRIBUTE {
    V t1_0(A(0)), t2_0(A(0)), t1_1(A(0)), t2_1(A(0));
    auto add = [&](const T* row, V& s1_0, V& s2_0, V& s1_1, V& s2_1) C10_ALWAYS_INLINE_ATTRIBUTE {
      const V d0 = load(row + c[0]) - about[0];
      const V d1 = load(row + c[1]) - about[1];
      s1_0 += d0;
      s2_0 = at::vec::fmadd(d0, d0, s2_0);
      s1_1 += d1;
      s2_1 = at::vec::fmadd(d1, d1, s2_1);
    };
    for (int64_t start = 0; start < n; start += kSumBlock) {
      const int64_t stop = std::min(n, start + kSumBlock);
      V e1_0(A(0)), e2_0(A(0)), e1_1(A(0)), e2_1(A(0));  // even positions
      V o1_0(A(0)), o2_0(A(0)), o1_1(A(0)), o2_1(A(0));  // odd positions
      int64_t pos = start;
      for (; pos + 2 <= stop; pos += 2) {
        const T* row = x + pos * C;
        if (pos + kPrefetchRows + 1 < n) {
          prefetch_pair(row + kPrefetchRows * C, c);
          prefetch_pair(row + (kPrefetchRows + 1) * C, c);
        }
        add(row, e1_0, e2_0, e1_1, e2_1);
        add(row + C, o1_0, o2_0, o1_1, o2_1);
      }
      if (pos < stop) add(x + pos * C, e1_0, e2_0, e1_1, e2_1);
      t1_0 += e1_0 + o1_0;
      t2_0 += e2_0 + o2_0;
      t1_1 += e1_1 + o1_1;
      t2_1 += e2_1 + o2_1;
    }
    return std::array<V, 4>{t1_0, t2_0, t1_1, t2_1};
  };
  V about[2] = {finite_or_zero(load(x + c[0])), finite_or_zero(load(x + c[1]))};  // as first_value_shift
  std::array<V, 4> sums = sums_about(about);
  bool recentre = false;
  for (int h = 0; h < 2; ++h) {
    A a1[N], a2[N];
    sums[2 * h].store(a1);
    sums[2 * h + 1].store(a2);
    for (int64_t l = 0; l < count; ++l) recentre |= needs_recentring(a1[l], a2[l], n);
  }
  if (C10_UNLIKELY(recentre)) {  // every lane: a lane already well centred keeps about that accuracy
    const V vn(static_cast<A>(n));
    about[0] = about[0] + sums[0] / vn;
    about[1] = about[1] + sums[2] / vn;
    sums = sums_about(about);
  }
  A* mean = p.mean + b * C;
  A* rstd = p.rstd + b * C;
  for (int h = 0; h < 2; ++h) {
    A ah[N], a1[N], a2[N];
    about[h].store(ah);
    sums[2 * h].store(a1);
    sums[2 * h + 1].store(a2);
    block_moments(ah, a1, a2, count, n, p.eps, mean + c[h], rstd + c[h]);
  }

  // Output: gate each pair and store it interleaved at channels 2j, 2j + 1.
  T* out = p.out + b * p.os.b + 2 * c[0];
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    LaneGates<A> lanes[2];
    pair_lane_gates(p.params, mean, rstd, c, count, lanes);
    const int64_t stored = kFull ? 2 * N : 2 * count;  // output lanes, over two vectors
    const PairOutputs outputs(layouts[c[0] / N], lanes);
    outputs.with_outputs([&](const auto& apply) {
      for (int64_t pos = 0; pos < n; ++pos) {
        const T* row = x + pos * C;
        V y0, y1;
        apply(load(row + c[0]), load(row + c[1]), y0, y1);
        put(out + pos * C, y0, std::min(N, stored));
        if (stored > N) put(out + pos * C + N, y1, stored - N);
      }
    });
  } else
#endif
  {
    const PairGates<V> gates = pair_gates(p.params, mean, rstd, c, count);
    gates.with_gates([&](const auto& gate) {
      for (int64_t pos = 0; pos < n; ++pos) {
        const T* row = x + pos * C;
        V xv[2], xc[2], s[2];
        for (int h = 0; h < 2; ++h) {
          xv[h] = load(row + c[h]);
          xc[h] = xv[h] - gates.mean[h];
        }
        gate(xc, s);
        store_pairs<T>(out + pos * C, xv[0] * s[0], xv[1] * s[1], kFull ? N : count, put);
      }
    });
  }
}

// Calls f(std::bool_constant<full>) for a vector of `count` lanes: full when count is all of them.
template <typename T, typename F>
inline void with_full(int64_t count, F&& f) {
  if (count == Lanes<T>::kSize) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename T>
void forward_channels_last(const ForwardArgs<T>& p) {
  PairLayouts layouts;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t<T>, float>) {
    constexpr int64_t N = Lanes<T>::kSize;
    const int64_t half_c = p.geo.channels / 2;
    for (int64_t j = 0; j < half_c; j += N) {
      const int64_t c[2] = {j, half_c + j};
      layouts.emplace_back(p.params.half, c, std::min(N, half_c - j));
    }
  }
#endif
  parallel_over_pair_vectors<T>(p.geo, 0, [&](int64_t b, const int64_t (&c)[2], int64_t count, acc_t<T>*) {
    with_full<T>(count, [&](auto full) { forward_pair_vector<T, decltype(full)::value>(p, b, c, count, layouts); });
    p.stores.fence();
  });
}

template <typename T>
void forward_kernel(const ForwardArgs<T>& p) {
  const bool cl = !planes_contiguous(p.xs, p.geo) && channels_last(p.xs, p.geo) &&
                  channels_last(p.os, p.geo);
  if (cl) {
    forward_channels_last(p);
  } else {
    forward_planes(p);
  }
}

// ---- backward ----------------------------------------------------------------------

template <typename T>
struct BackwardArgs {
  using A = acc_t<T>;
  const T* grad_out;  // read at output channel o(c)
  Strides gs;
  const T* x;
  Strides xs;
  T* dx;
  Strides ds;
  const A* mean;  // (B, C) contiguous
  const A* rstd;
  A* partials;  // (B, C, 2)
  Params<A> params;
  Geometry geo;
  OutputStores<T> stores;
};

template <typename T>
void backward_planes(const BackwardArgs<T>& p) {
  using A = acc_t<T>;
  const Geometry& g = p.geo;
  const int64_t n = g.hw();
  const int64_t per_block = planes_per_block(n, sizeof(T));
  parallel_over_blocks(g, per_block, [&](int64_t begin, int64_t end) {
    const PlaneAccess<T> xa(p.xs, g), dya(p.gs, g), dxa(p.ds, g);
    const OutputStores<T> put = dxa.in_place() ? p.stores : OutputStores<T>{};  // as forward_planes
    std::vector<A> scratch(per_block * n);
    std::vector<T> x_rows, dy_rows, dx_rows;  // for planes that are not contiguous runs
    if (!xa.in_place()) x_rows.resize(per_block * n);
    if (!dya.in_place()) dy_rows.resize(per_block * n);
    if (!dxa.in_place()) dx_rows.resize(per_block * n);
    const T* x[kMaxBlockPlanes];
    const T* dy[kMaxBlockPlanes];
    std::pair<A, A> sums[kMaxBlockPlanes];
    const A inv_n = A(1) / A(n);
    for (int64_t first = begin; first < end; first += per_block) {
      const int64_t count = std::min(per_block, end - first);
      const BlockPlanes where(first, count, g.channels, 2 * p.params.half);
      const A* mean = p.mean + first;
      const A* rstd = p.rstd + first;
      const BlockGates<A> gates(p.params, where, count, mean, rstd);
      for (int64_t k = 0; k < count; ++k) {
        const int64_t b = where.b[k], c = where.c[k];
        const int64_t o = plane_math::output_channel(c, g.channels);
        x[k] = xa.read(p.x + b * p.xs.b + c * p.xs.c, x_rows.data() + k * n);
        dy[k] = dya.read(p.grad_out + b * p.gs.b + o * p.gs.c, dy_rows.data() + k * n);
        sums[k] = backward_plane_sums(x[k], dy[k], n, mean[k], rstd[k], gates.gate[k], gates.constant[k],
                                      scratch.data() + k * n);
      }
      for (int64_t k = 0; k < count; ++k) {
        const Gate<A>& gate = gates.gate[k];
        const auto coef = plane_math::grad_coefficients(p.params, gate, rstd[k], sums[k].first, sums[k].second, inv_n);
        plane_math::plane_partials(p.partials + 2 * (first + k), gate.spatial, sums[k].first, sums[k].second, mean[k]);
        T* dx_plane = p.dx + where.b[k] * p.ds.b + where.c[k] * p.ds.c;
        T* dx = dxa.target(dx_plane, dx_rows.data() + k * n);
        backward_plane_dx(x[k], dy[k], dx, n, mean[k], gate, gates.constant[k], coef, scratch.data() + k * n,
                          put);
        dxa.finish(dx_plane, dx);
      }
    }
    put.fence();
  });
}

// Backward of one vector of channel pairs of image b (channels c[h] + l, l < count, of half
// h), in two passes over its slice of the image, as forward_pair_vector. `kept` (2 N values
// per position, or null) keeps pass 1's gates for pass 2: a sigmoid costs more than a store
// and a load.
template <typename T, bool kFull>
void backward_pair_vector(const BackwardArgs<T>& p, int64_t b, const int64_t (&channels)[2], int64_t count,
                          acc_t<T>* kept) {
  using V = typename Lanes<T>::V;
  using A = acc_t<T>;
  constexpr int64_t N = Lanes<T>::kSize;
  const int64_t c[2] = {channels[0], channels[1]};  // as in forward_pair_vector
  const OutputStores<T> put = p.stores;
  const int64_t C = p.geo.channels, n = p.geo.hw();
  const T* x = p.x + b * p.xs.b;
  const T* dy = p.grad_out + b * p.gs.b + 2 * c[0];
  T* dx = p.dx + b * p.ds.b;
  const A* mean = p.mean + b * C;
  const A* rstd = p.rstd + b * C;
  const V one(A(1));
  auto load = [count](const T* q) C10_ALWAYS_INLINE_ATTRIBUTE { return load_lanes<T, kFull>(q, count); };
  const PairGates<V> gates = pair_gates(p.params, mean, rstd, c, count);

  // The upstream gradient of pair j sits interleaved at output channels 2j, 2j + 1.
  auto load_dy = [&](int64_t pos, V (&out)[2]) C10_ALWAYS_INLINE_ATTRIBUTE {
    const T* src = dy + pos * C;
    V lo, hi;
    if constexpr (kFull) {
      lo = Lanes<T>::load(src);
      hi = Lanes<T>::load(src + N);
    } else {
      lo = load_count(src, std::min(N, 2 * count));
      hi = 2 * count > N ? load_count(src + N, 2 * count - N) : V(A(0));
    }
    std::tie(out[0], out[1]) = at::vec::deinterleave2(lo, hi);
  };
  // x at one position, and x - mean.
  auto load_centred = [&](int64_t pos, V (&xv)[2], V (&xc)[2]) C10_ALWAYS_INLINE_ATTRIBUTE {
    for (int h = 0; h < 2; ++h) {
      xv[h] = load(x + pos * C + c[h]);
      xc[h] = xv[h] - gates.mean[h];
    }
  };

  // Pass 1: plane sums S1 = sum(dt) and sum(dt * (x - mean)) per channel lane (named
  // accumulators, as in forward_pair_vector).
  V acc1[2], acc2[2];
  gates.with_gates([&](const auto& gate) {
    V a1_0(A(0)), a2_0(A(0)), a1_1(A(0)), a2_1(A(0));
    for (int64_t pos = 0; pos < n; ++pos) {
      if (pos + kPrefetchRows < n) {
        prefetch_pair(x + (pos + kPrefetchRows) * C, c);
        const int64_t dc[2] = {0, 2 * count > N ? N : 0};
        prefetch_pair(dy + (pos + kPrefetchRows) * C, dc);
      }
      V d[2], xv[2], xc[2], s[2];
      load_dy(pos, d);
      load_centred(pos, xv, xc);
      gate(xc, s);
      if (kept) {
        s[0].store(kept + 2 * pos * N);
        s[1].store(kept + (2 * pos + 1) * N);
      }
      const V dt0 = d[0] * xv[0] * s[0] * (one - s[0]);
      const V dt1 = d[1] * xv[1] * s[1] * (one - s[1]);
      a1_0 += dt0;
      a2_0 = at::vec::fmadd(dt0, xc[0], a2_0);
      a1_1 += dt1;
      a2_1 = at::vec::fmadd(dt1, xc[1], a2_1);
    }
    acc1[0] = a1_0;
    acc1[1] = a1_1;
    acc2[0] = a2_0;
    acc2[1] = a2_1;
  });
  V vk0[2], vk1[2];
  for (int h = 0; h < 2; ++h) {
    A a1[N], a2[N], k0[N] = {}, k1[N] = {};
    acc1[h].store(a1);
    acc2[h].store(a2);
    for_each_group_index(c[h], count, 2 * p.params.half, [&](int64_t l, int64_t k) {
      const int64_t ch = c[h] + l;
      const A s2 = a2[l] * rstd[ch];
      const auto gate = plane_math::gate_in_group<A>(p.params, k, mean[ch], rstd[ch]);
      const auto coef = plane_math::grad_coefficients(p.params, gate, rstd[ch], a1[l], s2, A(1) / A(n));
      plane_math::plane_partials(p.partials + 2 * (b * C + ch), gate.spatial, a1[l], s2, mean[ch]);
      k0[l] = coef.k0;
      k1[l] = coef.k1;
    });
    vk0[h] = V::loadu(k0);
    vk1[h] = V::loadu(k1);
  }

  // Pass 2: dx = dy * s + alpha * dt + k0 + k1 * (x - mean).
  auto write_dx = [&](int64_t pos, const V (&d)[2], const V (&xv)[2], const V (&xc)[2], const V (&s)[2]) C10_ALWAYS_INLINE_ATTRIBUTE {
    for (int h = 0; h < 2; ++h) {
      const V dt = d[h] * xv[h] * s[h] * (one - s[h]);
      const V r = at::vec::fmadd(d[h], s[h], at::vec::fmadd(gates.alpha[h], dt, at::vec::fmadd(vk1[h], xc[h], vk0[h])));
      put(dx + pos * C + c[h], r, kFull ? N : count);
    }
  };
  if (kept) {
    for (int64_t pos = 0; pos < n; ++pos) {
      V d[2], xv[2], xc[2];
      load_dy(pos, d);
      load_centred(pos, xv, xc);
      const V s[2] = {V::loadu(kept + 2 * pos * N), V::loadu(kept + (2 * pos + 1) * N)};
      write_dx(pos, d, xv, xc, s);
    }
  } else {
    gates.with_gates([&](const auto& gate) {
      for (int64_t pos = 0; pos < n; ++pos) {
        V d[2], xv[2], xc[2], s[2];
        load_dy(pos, d);
        load_centred(pos, xv, xc);
        gate(xc, s);
        write_dx(pos, d, xv, xc, s);
      }
    });
  }
}

template <typename T>
void backward_channels_last(const BackwardArgs<T>& p) {
  using A = acc_t<T>;
  constexpr int64_t N = Lanes<T>::kSize;
  // Gates kept between the passes: H * W positions x 2 halves x one vector, up to
  // kMaxKeptGateBytes; very large planes (whose slice leaves the cache anyway) recompute them.
  const int64_t vector_gates = p.geo.hw() * 2 * N;
  const bool keep = vector_gates * int64_t(sizeof(A)) <= kMaxKeptGateBytes;
  parallel_over_pair_vectors<T>(p.geo, keep ? vector_gates : 0,
                                [&](int64_t b, const int64_t (&c)[2], int64_t count, A* kept) {
    with_full<T>(count, [&](auto full) { backward_pair_vector<T, decltype(full)::value>(p, b, c, count, kept); });
    p.stores.fence();
  });
}

template <typename T>
void backward_kernel(const BackwardArgs<T>& p) {
  const Geometry& g = p.geo;
  const bool cl = !planes_contiguous(p.xs, g) && channels_last(p.xs, g) &&
                  channels_last(p.gs, g) && channels_last(p.ds, g);
  if (cl) {
    backward_channels_last(p);
  } else {
    backward_planes(p);
  }
}

// ---- the ops' CPU implementations ------------------------------------------------------

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> shuffle_attention_cpu(
    const at::Tensor& x, const at::Tensor& cweight, const at::Tensor& cbias,
    const at::Tensor& sweight, const at::Tensor& sbias, const at::Tensor& gn_weight,
    const at::Tensor& gn_bias, int64_t groups, double eps) {
  const checks::ParamRefs params = {&cweight, &cbias, &sweight, &sbias, &gn_weight, &gn_bias};
  checks::check_inputs(x, params, groups);
  const at::ScalarType acc = checks::acc_dtype(x.scalar_type());
  at::Tensor out = at::empty_like(x);  // x's memory format and strides, as the fake kernel
  at::Tensor mean = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc));
  if (x.numel() == 0) {
    mean.zero_();
    rstd.zero_();
    return {out, mean, rstd};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sa_kernels_cpu_forward", [&] {
    using A = acc_t<scalar_t>;
    const ParamTable<A> table(params);
    ForwardArgs<scalar_t> p;
    p.x = x.const_data_ptr<scalar_t>();
    p.xs = strides_of(x);
    p.out = out.data_ptr<scalar_t>();
    p.os = strides_of(out);
    p.mean = mean.data_ptr<A>();
    p.rstd = rstd.data_ptr<A>();
    p.params = table.params();
    p.geo = geometry_of(x);
    p.eps = eps;
    p.stores.stream = 2 * x.numel() * x.element_size() > last_level_cache_bytes();  // x and out
    forward_kernel(p);
  });
  return {out, mean, rstd};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
shuffle_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& cweight, const at::Tensor& cbias,
                               const at::Tensor& sweight, const at::Tensor& sbias,
                               const at::Tensor& gn_weight, const at::Tensor& gn_bias,
                               const at::Tensor& mean, const at::Tensor& rstd, int64_t groups,
                               double /*eps: rstd holds it*/) {
  const checks::ParamRefs params = {&cweight, &cbias, &sweight, &sbias, &gn_weight, &gn_bias};
  checks::check_backward_inputs(grad_out, x, params, mean, rstd, groups);
  at::Tensor dx = at::empty_like(x);  // x's memory format and strides, as the fake kernel
  at::Tensor grads[6];
  for (int i = 0; i < 6; ++i) grads[i] = at::empty(params[i]->sizes(), params[i]->options());
  if (x.numel() == 0) {
    for (auto& g : grads) g.zero_();
    return {dx, grads[0], grads[1], grads[2], grads[3], grads[4], grads[5]};
  }
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sa_kernels_cpu_backward", [&] {
    using A = acc_t<scalar_t>;
    const ParamTable<A> table(params);
    std::vector<A> partials(2 * x.size(0) * x.size(1));
    BackwardArgs<scalar_t> p;
    p.grad_out = grad_out.const_data_ptr<scalar_t>();
    p.gs = strides_of(grad_out);
    p.x = x.const_data_ptr<scalar_t>();
    p.xs = strides_of(x);
    p.dx = dx.data_ptr<scalar_t>();
    p.ds = strides_of(dx);
    p.mean = mean_c.const_data_ptr<A>();
    p.rstd = rstd_c.const_data_ptr<A>();
    p.partials = partials.data();
    p.params = table.params();
    p.geo = geometry_of(x);
    p.stores.stream = 3 * x.numel() * x.element_size() > last_level_cache_bytes();  // x, dy and dx
    backward_kernel(p);

    // Fixed-order (batch, then group) sums: bitwise the same for any thread count.
    const int64_t half = p.params.half;
    std::vector<A> acc_grads(6 * half);
    for (int64_t k = 0; k < half; ++k) {
      A g6[6];
      plane_math::parameter_gradients(p.params, partials.data(), p.geo.batch, p.geo.channels, k, g6);
      for (int i = 0; i < 6; ++i) acc_grads[i * half + k] = g6[i];
    }
    for (int i = 0; i < 6; ++i) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[i].scalar_type(), "sa_grads", [&] {
        scalar_t* dst = grads[i].data_ptr<scalar_t>();
        for (int64_t k = 0; k < half; ++k) dst[k] = static_cast<scalar_t>(acc_grads[i * half + k]);
      });
    }
  });
  return {dx, grads[0], grads[1], grads[2], grads[3], grads[4], grads[5]};
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace sa_kernels
