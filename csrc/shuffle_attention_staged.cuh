// Small planes staged in shared memory, forward and backward (the "staged" path).
//
// A warp or block per plane leaves too few bytes in flight when planes are small (7x7,
// 8x8, 14x14: a 4-byte load or two per lane). Here a block owns a tile of 2n output
// planes 2 j0 .. 2 (j0 + n) - 1, i.e. input planes j0 .. j0 + n - 1 and C/2 + j0 ..
// C/2 + j0 + n - 1 of one image: two contiguous runs of n * H * W input elements and one
// contiguous run of 2n * H * W output elements. Every thread issues all its 16-byte copies
// of the tile into shared memory at once (cp.async: no registers held); a team of S lanes
// per plane reduces the plane's statistics (fixed order: bitwise reproducible) and writes
// its gated values into an output-ordered tile (plane by plane: the shuffle costs no
// per-element index arithmetic); then the block writes that tile with 16-byte stores.
//
// Needs every plane contiguous with the channels packed (channel stride H * W), 16-byte
// aligned pointers, batch strides and runs (staged_tiling checks the rest).
#pragma once

#include <cstdint>

#include "shuffle_attention.h"
#include "shuffle_attention_common.cuh"

namespace sa_kernels {
namespace detail {

// Bytes of one staged tensor tile (x; the backward stages grad_out too).
constexpr int kStagedTileBytes = 16 * 1024;
// At most this many planes per run (the per-plane arrays in shared memory hold 2x that).
constexpr int kStagedMaxRun = 128;
// Planes of more elements than this take the per-plane kernels: a team of 32 lanes then
// sums at most 16 elements each.
constexpr int kStagedMaxPlane = 512;

template <typename T> constexpr int kStagedElems = kStagedTileBytes / int(sizeof(T));

struct StagedTiling {
  int run;    // n: planes per run (0: the staged path cannot take this shape)
  int lanes;  // S: lanes per plane in the statistics (a power of two, at most 32)
  int tiles;  // tiles per image: ceil((C/2) / run)
};

__host__ __device__ inline int gcd_int(int a, int b) {
  while (b != 0) {
    const int t = a % b;
    a = b;
    b = t;
  }
  return a;
}

// Planes per run: as many as fit a tile (two runs), a multiple of V / gcd(H * W, V) so
// every run starts on a 16-byte boundary, at most kStagedMaxRun and C/2. Lanes per plane:
// about four elements each, 1 to 32. The kernels recompute this from the shape.
template <typename T>
__host__ __device__ inline StagedTiling staged_tiling(int64_t hw, int64_t half_c) {
  constexpr int V = kVec16<T>;
  StagedTiling t{0, 1, 0};
  if (hw < 1 || hw > kStagedMaxPlane || half_c > INT32_MAX || (half_c * hw) % V != 0) return t;
  const int h = int(hw);
  const int step = V / gcd_int(h, V);
  int run = kStagedElems<T> / (2 * h);
  if (run > kStagedMaxRun) run = kStagedMaxRun;
  if (int64_t(run) > half_c) run = int(half_c);
  run -= run % step;
  if (run < 1) return t;
  int lanes = 1;
  while (lanes < kWarp && lanes * 4 < h) lanes *= 2;
  return {run, lanes, int(ceil_div(half_c, run))};
}

// Every plane one contiguous run of H * W elements, consecutive channels adjacent, and
// 16-byte vectors throughout (pointer, batch stride).
inline bool staged_layout(const void* ptr, const Strides4& s, const Shape4& n, int vec) {
  const int64_t hw = n.height * n.width;
  return plane_is_contiguous(s, n) && (n.channels == 1 || s.c == hw) &&
         reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (n.batch == 1 || s.b % vec == 0);
}

// The staged path's tiling of this shape, or none (run 0) where it cannot take it.
template <typename T>
inline StagedTiling staged_plan(const Shape4& n) {
  StagedTiling t = staged_tiling<T>(n.height * n.width, n.channels / 2);
  if (t.run > 0 && n.batch * t.tiles > INT32_MAX) t.run = 0;  // work items are 32-bit
  return t;
}

// Sum over aligned groups of `lanes` lanes (a power of two <= 32; every lane of the warp
// takes part), returned to every lane of the group. Butterfly order: reproducible.
template <typename Acc, int N>
__device__ __forceinline__ void group_allreduce(Acc (&v)[N], int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(kFullMask, v[i], offset);
  }
}

// Tile-local plane q (q < n: input plane j0 + q; else C/2 + j0 + q - n) -> its output-local
// plane 2 (q mod n) + (q >= n).
__device__ __forceinline__ int staged_output_plane(int q, int n) {
  return q < n ? 2 * q : 2 * (q - n) + 1;
}

// Copies packs v = threadIdx.x, + kBlock, ... (v < 2 * run_packs) of a tile's two runs (run
// 0 at src0, run 1 at src1) to tile[v], all in flight together (async_copy16).
template <typename P>
__device__ __forceinline__ void stage_two_runs(P* tile, const P* src0, const P* src1, int run_packs) {
  for (int v = threadIdx.x; v < 2 * run_packs; v += kBlock) {
    async_copy16(tile + v, v < run_packs ? src0 + v : src1 + (v - run_packs));
  }
}

template <typename P>
__device__ __forceinline__ void stage_run(P* tile, const P* src, int packs) {
  for (int v = threadIdx.x; v < packs; v += kBlock) async_copy16(tile + v, src + v);
}

template <typename T>
__global__ void __launch_bounds__(kBlock) forward_staged_kernel(const ForwardParams<T> p) {
  using Acc = acc_t<T>;
  constexpr int V = kVec16<T>;
  using P = Pack<T, V>;
  constexpr int kPacks = kStagedElems<T> / V;
  __shared__ P x_tile[kPacks];    // input order: run 0's planes, then run 1's
  __shared__ P out_tile[kPacks];  // output order
  const T* x_e = reinterpret_cast<const T*>(x_tile);
  T* out_e = reinterpret_cast<T*>(out_tile);

  const int64_t channels = p.shape.channels;
  const int64_t half_c = channels / 2;
  const int hw = int(p.shape.height * p.shape.width);
  const StagedTiling tiling = staged_tiling<T>(hw, half_c);  // run >= 1 (launcher)
  const int lanes = tiling.lanes;
  const int teams = kBlock / lanes;
  const int team = threadIdx.x / lanes;
  const int lane = threadIdx.x % lanes;

  for (int64_t work = blockIdx.x; work < p.shape.batch * tiling.tiles; work += gridDim.x) {
    // 32-bit division (batch * tiles <= INT32_MAX: launcher); a 64-bit one is a call
    // whose saved registers spilled to the stack.
    const int tile = int(work) % tiling.tiles;
    const int64_t b = int(work) / tiling.tiles;
    const int64_t j0 = int64_t(tile) * tiling.run;
    const int n = int(half_c - j0 < tiling.run ? half_c - j0 : tiling.run);
    const int run_packs = n * hw / V;  // whole: staged_tiling
    const T* x0 = p.x + b * p.x_stride.b + j0 * hw;

    stage_two_runs(x_tile, reinterpret_cast<const P*>(x0),
                   reinterpret_cast<const P*>(x0 + half_c * hw), run_packs);
    async_copy_wait();
    __syncthreads();

    // Plane q = team, team + teams, ... (the same rounds for every lane): its statistics,
    // then its gated values into the output-ordered tile, by the same team.
    const int rounds = (2 * n + teams - 1) / teams;
    for (int r = 0; r < rounds; ++r) {
      const int q = r * teams + team;
      const bool active = q < 2 * n;
      const T* plane = x_e + (active ? q : 0) * hw;
      Acc sum[1] = {Acc(0)};
      if (active) {
        for (int e = lane; e < hw; e += lanes) sum[0] += to_acc(plane[e]);
      }
      group_allreduce(sum, lanes);
      const Acc mean = sum[0] / Acc(hw);
      Acc m2[1] = {Acc(0)};
      if (active) {
        for (int e = lane; e < hw; e += lanes) {
          const Acc d = to_acc(plane[e]) - mean;
          m2[0] += d * d;
        }
      }
      group_allreduce(m2, lanes);
      if (!active) continue;  // after the round's shuffles
      const Acc rstd = inv_sqrt(m2[0] / Acc(hw) + Acc(p.eps));
      const int64_t c = q < n ? j0 + q : half_c + j0 + (q - n);
      if (lane == 0) {
        p.mean[b * channels + c] = mean;
        p.rstd[b * channels + c] = rstd;
      }
      const PlaneGate<Acc> gate = plane_gate(p.gate, c, mean, rstd);
      T* dst = out_e + staged_output_plane(q, n) * hw;
      for (int e = lane; e < hw; e += lanes) dst[e] = gated<T>(to_acc(plane[e]), mean, gate);
    }
    __syncthreads();

    // The 2n output planes are one contiguous run starting at output channel 2 j0.
    P* out = reinterpret_cast<P*>(p.out + b * p.out_stride.b + 2 * j0 * hw);
    for (int v = threadIdx.x; v < 2 * run_packs; v += kBlock) out[v] = out_tile[v];
    __syncthreads();  // the next tile overwrites both tiles
  }
}

// As the forward, staging x (input order) and grad_out (output order: one contiguous run
// at output channel 2 j0). Each plane's team reduces S1 and S2 and then writes the plane's
// dx over its x in the tile (each lane rewrites only the elements it read); the block
// writes the tile out as two runs.
template <typename T>
__global__ void __launch_bounds__(kBlock) backward_staged_kernel(const BackwardParams<T> p) {
  using Acc = acc_t<T>;
  constexpr int V = kVec16<T>;
  using P = Pack<T, V>;
  constexpr int kPacks = kStagedElems<T> / V;
  __shared__ P x_tile[kPacks];   // input order; dx replaces x plane by plane
  __shared__ P dy_tile[kPacks];  // output order
  T* x_e = reinterpret_cast<T*>(x_tile);
  const T* dy_e = reinterpret_cast<const T*>(dy_tile);

  const int64_t channels = p.shape.channels;
  const int64_t half_c = channels / 2;
  const int hw = int(p.shape.height * p.shape.width);
  const Acc inv_n = Acc(1) / Acc(hw);
  const StagedTiling tiling = staged_tiling<T>(hw, half_c);  // run >= 1 (launcher)
  const int lanes = tiling.lanes;
  const int teams = kBlock / lanes;
  const int team = threadIdx.x / lanes;
  const int lane = threadIdx.x % lanes;

  for (int64_t work = blockIdx.x; work < p.shape.batch * tiling.tiles; work += gridDim.x) {
    // 32-bit division (batch * tiles <= INT32_MAX: launcher); a 64-bit one is a call
    // whose saved registers spilled to the stack.
    const int tile = int(work) % tiling.tiles;
    const int64_t b = int(work) / tiling.tiles;
    const int64_t j0 = int64_t(tile) * tiling.run;
    const int n = int(half_c - j0 < tiling.run ? half_c - j0 : tiling.run);
    const int run_packs = n * hw / V;
    const T* x0 = p.x + b * p.x_stride.b + j0 * hw;
    const T* dy = p.grad_out + b * p.grad_out_stride.b + 2 * j0 * hw;

    stage_two_runs(x_tile, reinterpret_cast<const P*>(x0),
                   reinterpret_cast<const P*>(x0 + half_c * hw), run_packs);
    stage_run(dy_tile, reinterpret_cast<const P*>(dy), 2 * run_packs);
    async_copy_wait();
    __syncthreads();

    const int rounds = (2 * n + teams - 1) / teams;
    for (int r = 0; r < rounds; ++r) {
      const int q = r * teams + team;
      const bool active = q < 2 * n;
      const int64_t c = q < n ? j0 + q : half_c + j0 + (q - n);
      const int64_t plane = b * channels + c;
      T* xq = x_e + (active ? q : 0) * hw;
      const T* dyq = dy_e + (active ? staged_output_plane(q, n) : 0) * hw;
      Acc mean = Acc(0), rstd = Acc(0);
      PlaneGate<Acc> gate{Acc(0), Acc(0), false, 0};
      Acc sums[2] = {Acc(0), Acc(0)};  // sum(dt), sum(dt * (x - mean))
      if (active) {
        mean = p.mean[plane];
        rstd = p.rstd[plane];
        gate = plane_gate(p.gate, c, mean, rstd);
        for (int e = lane; e < hw; e += lanes) {
          const ElementGrad<Acc> g = element_grad(to_acc(xq[e]), to_acc(dyq[e]), mean, gate);
          sums[0] += g.dt;
          sums[1] += g.dt * g.xc;
        }
      }
      group_allreduce(sums, lanes);
      if (!active) continue;  // after the round's shuffles
      const Acc s1 = sums[0];
      const Acc s2 = sums[1] * rstd;
      if (lane == 0) write_partials(p, b, c, gate.spatial, s1, s2, mean);
      const GradCoefficients<Acc> k = grad_coefficients(p.gate, gate, rstd, s1, s2, inv_n);
      for (int e = lane; e < hw; e += lanes) {
        const Acc dye = to_acc(dyq[e]);
        const ElementGrad<Acc> g = element_grad(to_acc(xq[e]), dye, mean, gate);
        xq[e] = grad_x<T>(dye, g, gate, k);
      }
    }
    __syncthreads();

    // dx in input order: the tile's first run_packs packs are run 0, the rest run 1.
    P* dx0 = reinterpret_cast<P*>(p.grad_x + b * p.grad_x_stride.b + j0 * hw);
    P* dx1 = reinterpret_cast<P*>(p.grad_x + b * p.grad_x_stride.b + (half_c + j0) * hw);
    for (int v = threadIdx.x; v < 2 * run_packs; v += kBlock) {
      if (v < run_packs) {
        dx0[v] = x_tile[v];
      } else {
        dx1[v - run_packs] = x_tile[v];
      }
    }
    __syncthreads();  // the next tile overwrites both tiles
  }
}

}  // namespace detail
}  // namespace sa_kernels
