// Shuffle Attention (SA-Net) CUDA kernels: parameter structs and launcher declarations.
//
// Plain C++/CUDA only (no torch): the torch binding (torch_binding.cpp) fills these
// structs from tensors, and the kernels (shuffle_attention_fwd.cu / _bwd.cu) compile
// with nvcc alone.
//
// Semantics, per (b, c) plane of x (B, C, H, W), C = 2 * G * half:
//   out[b, o(c)] = x * sigmoid(alpha * (x - mean) + beta),  o(c) = 2 * (c % (C/2)) + c / (C/2)
// with k = c % (2 * half): channel planes (k < half, p = k) alpha = 0,
// beta = cweight[p] * mean + cbias[p]; spatial planes (p = k - half)
// alpha = sweight[p] * gn_weight[p] * rstd, beta = sweight[p] * gn_bias[p] + sbias[p].
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "plane_math.h"

namespace sa_kernels {

// Statistics, partial sums and parameters: float64 for double x, float32 otherwise.
template <typename T> struct AccumulateType { using type = float; };
template <> struct AccumulateType<double> { using type = double; };
template <typename T> using acc_t = typename AccumulateType<T>::type;

struct Shape4 {
  int64_t batch, channels, height, width;
};

// Element strides of a (B, C, H, W) tensor, as torch reports them.
struct Strides4 {
  int64_t b, c, h, w;
};

// The six per-channel parameters, `half` contiguous values each, in the accumulation type
// (the per-plane maths of plane_math.h, shared with the CPU kernels).
template <typename Acc>
using GateParams = plane_math::Params<Acc>;

template <typename T>
struct ForwardParams {
  using Acc = acc_t<T>;
  const T* x;
  Strides4 x_stride;
  T* out;  // output channel o(c) holds input channel c
  Strides4 out_stride;
  GateParams<Acc> gate;
  Acc* mean;  // (B, C), contiguous
  Acc* rstd;  // (B, C), contiguous
  Shape4 shape;
  double eps;
  // Planes with more than this many elements take the two-sweep path even where they
  // would fit on chip; negative: no limit. A test hook (set from Python) to reach the
  // two-sweep path with small shapes.
  int64_t register_plane_limit;
  // Which kernel family runs where several could (Variant below; 0: the launcher's choice).
  // A test and measurement hook, set from Python.
  int64_t variant = 0;
};

// Parameter gradients, `half` contiguous values each, in the accumulation type.
template <typename Acc>
struct ParamGrads {
  Acc* cweight;
  Acc* cbias;
  Acc* sweight;
  Acc* sbias;
  Acc* gn_weight;
  Acc* gn_bias;
};

template <typename T>
struct BackwardParams {
  using Acc = acc_t<T>;
  const T* grad_out;  // read at the output channel o(c)
  Strides4 grad_out_stride;
  const T* x;
  Strides4 x_stride;
  T* grad_x;
  Strides4 grad_x_stride;
  GateParams<Acc> gate;
  const Acc* mean;  // (B, C), contiguous, from the forward
  const Acc* rstd;  // (B, C), contiguous, from the forward
  // Workspace of B * C * 2 values (16-byte aligned), fully written by the first kernel and
  // read by the second. Laid out for the second: (half, B * G, 4), i.e. for parameter
  // index k and row r = b * G + g the channel plane's S1 and S1 * mean, then the spatial
  // plane's S1 and S2 (partial_slot in shuffle_attention_common.cuh).
  Acc* partials;
  ParamGrads<Acc> grads;
  Shape4 shape;
  int64_t register_plane_limit;  // as in ForwardParams
  int64_t variant = 0;           // as in ForwardParams
};

// The measurement hook's integer, decoded. Each field forces one kernel family where it
// can run (and is ignored where it cannot); 0 leaves the choice to the launcher.
//   bits 0-3   contiguous (NCHW) planes: 1 one plane per team (held in registers, or two
//              sweeps), 2 several small planes per block staged in shared memory, 3 one
//              plane per thread-block cluster held in registers (sm_90; bits 8-15, if 2 or
//              more, give its blocks)
//   bits 4-7   parameter-gradient reduction: 1 a warp per parameter index, 2 a block
//   bits 8-15  channels_last: 1 one block per channel tile, n >= 2 the H * W positions of
//              each tile split over a thread-block cluster of n blocks (sm_90 only)
struct Variant {
  enum Planes : int { kPlanesAuto = 0, kPlanesPerPlane = 1, kPlanesStaged = 2, kPlanesCluster = 3 };
  enum Reduce : int { kReduceAuto = 0, kReduceWarp = 1, kReduceBlock = 2 };
  int planes;
  int reduce;
  int cluster;  // 0 auto, 1 none, 2..16 blocks

  static Variant decode(int64_t v) {
    return {int(v & 0xf), int((v >> 4) & 0xf), int((v >> 8) & 0xff)};
  }
};

// Launch on `stream`; no allocation, no synchronisation (safe under CUDA graph capture).
// Return the first launch error (cudaSuccess when none); nothing is launched for an
// empty tensor. H * W and C must not exceed INT32_MAX (cudaErrorInvalidValue otherwise).
template <typename T>
cudaError_t shuffle_attention_forward(const ForwardParams<T>& params, cudaStream_t stream);
template <typename T>
cudaError_t shuffle_attention_backward(const BackwardParams<T>& params, cudaStream_t stream);

// ---- Memory layouts (host side), shared by the launchers' path choice -------------

// Every (b, c) plane is one contiguous run of H * W elements (any batch/channel strides).
inline bool plane_is_contiguous(const Strides4& s, const Shape4& n) {
  const bool w_ok = n.width == 1 || s.w == 1;
  const bool h_ok = n.height == 1 || s.h == n.width;
  return w_ok && h_ok;
}

// Element (b, c, h, w) sits at ((b * H + h) * W + w) * C + c: torch's channels_last
// contiguity, where the stride of a size-1 dimension does not matter.
inline bool is_channels_last(const Strides4& s, const Shape4& n) {
  int64_t expected = 1;
  const int64_t sizes[4] = {n.channels, n.width, n.height, n.batch};
  const int64_t strides[4] = {s.c, s.w, s.h, s.b};
  for (int d = 0; d < 4; ++d) {
    if (sizes[d] == 1) continue;
    if (strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return true;
}

// 16-byte loads/stores of whole planes: the pointer is 16-byte aligned and every
// plane starts on a multiple of `vec` elements (so does every vector within it).
inline bool planes_vector_aligned(const void* ptr, const Strides4& s, const Shape4& n, int vec) {
  const int64_t hw = n.height * n.width;
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && hw % vec == 0 && s.b % vec == 0 &&
         s.c % vec == 0;
}

}  // namespace sa_kernels
