// Device helpers shared by the forward and backward kernels: element conversion,
// vector packs, per-plane gate coefficients, deterministic reductions, Welford merges.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "shuffle_attention.h"

namespace sa_kernels {
namespace detail {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Threads per block for every main kernel.
constexpr int kBlock = 256;
constexpr int kBlockWarps = kBlock / kWarp;
// Grid-stride loops cover any number of planes with at most this many blocks.
constexpr int64_t kMaxBlocks = int64_t(1) << 30;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned grid_for(int64_t blocks) {
  return unsigned(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

// Every launch goes through here so each one is followed by an error check. The CPU
// emulation in tests/cuda_emulation compiles the kernels as host C++ and defines
// SA_KERNELS_EMULATION to supply its own launch, launch_cluster, device_sms and
// max_cluster_blocks.
#ifndef SA_KERNELS_EMULATION
template <typename... KernelArgs, typename... Args>
inline cudaError_t launch(void (*kernel)(KernelArgs...), int64_t blocks, cudaStream_t stream,
                          const Args&... args) {
  kernel<<<grid_for(blocks), kBlock, 0, stream>>>(args...);
  return cudaGetLastError();
}

// `clusters` clusters of `cluster_blocks` blocks (sm_90 thread-block clusters; see
// max_cluster_blocks for what the device and the kernel's binary allow).
template <typename... KernelArgs, typename... Args>
inline cudaError_t launch_cluster(void (*kernel)(KernelArgs...), int64_t clusters,
                                  int cluster_blocks, cudaStream_t stream, const Args&... args) {
  cudaLaunchConfig_t config = {};
  const unsigned blocks = grid_for(clusters * cluster_blocks) / cluster_blocks * cluster_blocks;
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(kBlock);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = unsigned(cluster_blocks);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, args...);
  return err != cudaSuccess ? err : cudaGetLastError();
}

constexpr int kMaxDevices = 64;

// Multiprocessors of the current device (cached per device).
inline int device_sms() {
  static std::atomic<int> cache[kMaxDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return 1;
  int sms = cache[device].load();
  if (sms == 0) {
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) sms = 1;
    cache[device].store(sms);
  }
  return sms;
}

// The largest cluster (16, 8, 4 or 2 blocks; 1: none) `kernel` can run with on the current
// device: compute capability 9.0 or more and a binary built for it (an sm_80 binary, or
// PTX compiled for compute_80, has no cluster code), and at least one such cluster able to
// reside (cudaOccupancyMaxActiveClusters). Queried once per device and kernel; the
// queries' errors are cleared so the next launch's check sees only its own.
template <typename... KernelArgs>
inline int max_cluster_blocks(void (*kernel)(KernelArgs...)) {
  static std::atomic<int> cache[kMaxDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
    cudaGetLastError();
    return 1;
  }
  int result = cache[device].load();
  if (result != 0) return result;
  result = 1;
  int major = 0;
  cudaFuncAttributes attributes;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
      major >= 9 && cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess &&
      attributes.binaryVersion >= 90) {
    for (int blocks = 16; blocks >= 2; blocks /= 2) {
      const cudaFuncAttribute non_portable = cudaFuncAttributeNonPortableClusterSizeAllowed;
      if (blocks > 8 && cudaFuncSetAttribute(kernel, non_portable, 1) != cudaSuccess) continue;
      cudaLaunchConfig_t config = {};
      config.gridDim = dim3(unsigned(blocks));
      config.blockDim = dim3(kBlock);
      cudaLaunchAttribute attribute;
      attribute.id = cudaLaunchAttributeClusterDimension;
      attribute.val.clusterDim.x = unsigned(blocks);
      attribute.val.clusterDim.y = 1;
      attribute.val.clusterDim.z = 1;
      config.attrs = &attribute;
      config.numAttrs = 1;
      int clusters = 0;
      if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess && clusters > 0) {
        result = blocks;
        break;
      }
    }
  }
  cudaGetLastError();
  cache[device].store(result);
  return result;
}
#endif

// ---- element conversion: loads widen to Acc, stores round once ----------------------

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
// bfloat16 is the upper half of a float: the same bits as __bfloat162float, spelled as a
// plain shift. Through __bfloat162float (inline PTX) nvcc 13.0 kept every converted value
// of a held plane live instead of converting again at each use: the bfloat16 held
// kernels took 100-176 registers against 64-112 for float16 (sm_90, ptxas -v).
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) {
  const unsigned bits = unsigned(__bfloat16_as_ushort(v)) << 16;
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// float: the hardware exponential and an approximate reciprocal (a few instructions instead
// of expf's polynomial and an IEEE division with its slow path: the staged kernels spent about
// 55 instructions an element). Error: __expf's 2 + 1.2 |z| ulp (CUDA C++ guide), mostly from
// rounding z * log2(e) to float, plus 2 ulp; so s and 1 - s keep a relative error of about
// 1e-6 for |z| < 10. The host emulation rounds z * log2(e) the same way, so the CPU tests see
// the main error term too.
__device__ __forceinline__ float sigmoid(float z) {
#ifdef __CUDA_ARCH__
  return __fdividef(1.0f, 1.0f + __expf(-z));
#else
  return 1.0f / (1.0f + exp2f(-z * 1.44269504f));
#endif
}
__device__ __forceinline__ double sigmoid(double z) { return 1.0 / (1.0 + exp(-z)); }

__device__ __forceinline__ float inv_sqrt(float v) { return 1.0f / sqrtf(v); }
__device__ __forceinline__ double inv_sqrt(double v) { return 1.0 / sqrt(v); }

// N consecutive elements, aligned to their full size, so a pack of 16 bytes is one
// 128-bit load or store.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// One 16-byte global store of a pack built element by element. Assigned as a Pack, or even
// as a uint4, nvcc 13.0 emitted four st.global.f32 for the channels_last split backward's
// dx (sm_90); __stwb gave one STG.E.128.STRONG.SM (a stronger ordering than needed); a
// plain st.global.v4 in PTX is one STG.E.128.
template <typename P>
__device__ __forceinline__ void store16(P* dst, const P& pack) {
  static_assert(sizeof(P) == 16 && alignof(P) == 16, "a 16-byte pack");
  uint4 bits;
  memcpy(&bits, &pack, sizeof(bits));
#ifdef __CUDA_ARCH__
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(bits.x), "r"(bits.y),
               "r"(bits.z), "r"(bits.w)
               : "memory");
#else
  *reinterpret_cast<uint4*>(dst) = bits;
#endif
}

// 16 bytes from global to shared memory without passing through registers (cp.async,
// sm_80+): a thread can have all its copies of a tile in flight at no register cost.
// They land after async_copy_wait() and a barrier. The host emulation copies at once.
template <typename P>
__device__ __forceinline__ void async_copy16(P* shared_dst, const P* global_src) {
  static_assert(sizeof(P) == 16, "cp.async.cg copies 16 bytes");
#ifdef __CUDA_ARCH__
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global_src)
               : "memory");
#else
  *shared_dst = *global_src;
#endif
}

// Waits for this thread's async_copy16 copies; a barrier then publishes them to the block.
__device__ __forceinline__ void async_copy_wait() {
#ifdef __CUDA_ARCH__
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
#endif
}

// Two adjacent elements as one store (pointer aligned to 2 * sizeof(T)). Spelled with
// CUDA's vector types: nvcc split a 2-element struct copy into two scalar stores. For
// float and double even a float2/double2 assignment came out as two st.global in the
// channels_last kernels (nvcc 13.0, sm_90), so the device build stores through __stwb,
// which keeps one st.global.wb.v2; the host-emulated build (tests) assigns.
__device__ __forceinline__ void store_pair(float* p, float a, float b) {
#ifdef __CUDA_ARCH__
  __stwb(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
#endif
}
__device__ __forceinline__ void store_pair(double* p, double a, double b) {
#ifdef __CUDA_ARCH__
  __stwb(reinterpret_cast<double2*>(p), make_double2(a, b));
#else
  *reinterpret_cast<double2*>(p) = make_double2(a, b);
#endif
}
__device__ __forceinline__ void store_pair(__half* p, __half a, __half b) {
  *reinterpret_cast<__half2*>(p) = __halves2half2(a, b);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* p, __nv_bfloat16 a, __nv_bfloat16 b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __halves2bfloat162(a, b);
}

// Two adjacent elements as one load (pointer aligned to 2 * sizeof(T)).
__device__ __forceinline__ void load_pair(const float* p, float& a, float& b) {
  const float2 v = *reinterpret_cast<const float2*>(p);
  a = v.x;
  b = v.y;
}
__device__ __forceinline__ void load_pair(const double* p, double& a, double& b) {
  const double2 v = *reinterpret_cast<const double2*>(p);
  a = v.x;
  b = v.y;
}
__device__ __forceinline__ void load_pair(const __half* p, __half& a, __half& b) {
  const __half2 v = *reinterpret_cast<const __half2*>(p);
  a = v.x;
  b = v.y;
}
__device__ __forceinline__ void load_pair(const __nv_bfloat16* p, __nv_bfloat16& a,
                                          __nv_bfloat16& b) {
  const __nv_bfloat162 v = *reinterpret_cast<const __nv_bfloat162*>(p);
  a = v.x;
  b = v.y;
}

template <typename T> constexpr int kVec16 = int(16 / sizeof(T));  // elements per 16 bytes

// Channels-last kernels: a block owns kPairs channel pairs (j, C/2 + j) of one image and
// sweeps all its H * W positions with kBlock / kPairs rows of threads. Each run of
// kPairs channels a warp reads is at least one whole 32-byte sector.
template <typename T> constexpr int kChannelsLastPairs = sizeof(T) >= 4 ? 8 : 16;

// ---- plane indexing ---------------------------------------------------------------

// Channel arithmetic is 32-bit (C <= INT32_MAX: launchers). A 64-bit division or modulo
// is a call to a subroutine, whose saved registers can spill to the stack.

// Input channel c = i * C/2 + j goes to output channel 2 * j + i.
__device__ __forceinline__ int64_t output_channel(int64_t c, int64_t channels) {
  const int half_c = int(channels) / 2;
  return 2 * (int(c) % half_c) + int(c) / half_c;
}

// Offset of element `i` (0 <= i < H * W, row-major in the plane) of a plane with the
// given strides: for planes that are not one contiguous run.
__device__ __forceinline__ int64_t strided_offset(int64_t i, int width, const Strides4& s) {
  const int i32 = int(i);  // H * W <= INT32_MAX (checked by the launchers)
  const int h = i32 / width;
  const int w = i32 - h * width;
  return int64_t(h) * s.h + int64_t(w) * s.w;
}

// Loads and stores of element packs within one plane: either the plane is one
// contiguous run (pack v covers elements [v * VEC, v * VEC + VEC)), or it is read
// element by element through its H and W strides (VEC = 1).
template <typename T, int VEC, bool STRIDED>
struct PlaneIO {
  static_assert(!STRIDED || VEC == 1, "strided planes are accessed element by element");
  using P = Pack<T, VEC>;

  __device__ __forceinline__ static P load(const T* plane, int64_t v, int width,
                                           const Strides4& s) {
    if constexpr (STRIDED) {
      P r;
      r.v[0] = plane[strided_offset(v, width, s)];
      return r;
    } else {
      return reinterpret_cast<const P*>(plane)[v];
    }
  }

  // Packs v0, v0 + step, ... (kUnroll of them; those at or past `packs` are left alone),
  // all loads issued before any is used, so they are in flight together.
  template <int kUnroll>
  __device__ __forceinline__ static void load_unrolled(P (&in)[kUnroll], const T* plane, int64_t v0,
                                                       int64_t step, int64_t packs, int width,
                                                       const Strides4& s) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + int64_t(u) * step;
      if (v < packs) in[u] = load(plane, v, width, s);
    }
  }

  __device__ __forceinline__ static void store(T* plane, int64_t v, const P& pack, int width,
                                               const Strides4& s) {
    if constexpr (STRIDED) {
      plane[strided_offset(v, width, s)] = pack.v[0];
    } else {
      reinterpret_cast<P*>(plane)[v] = pack;
    }
  }
};

// The gate of one plane, out = x * sigmoid(alpha * (x - mean) + beta), where its parameters
// live, and dx's plane coefficients: csrc/plane_math.h, shared with the CPU kernels.
template <typename Acc>
using PlaneGate = plane_math::Gate<Acc>;
using plane_math::GradCoefficients;
using plane_math::grad_coefficients;
using plane_math::plane_gate;

template <typename T, typename Acc>
__device__ __forceinline__ T gated(Acc x, Acc mean, const PlaneGate<Acc>& g) {
  return from_acc<T>(x * sigmoid(g.alpha * (x - mean) + g.beta));
}

// Per element of the backward: the gate s, dt = dy * x * s * (1 - s) (the gradient at
// the gate's pre-activation) and the centred input x - mean.
template <typename Acc>
struct ElementGrad {
  Acc s, dt, xc;
};

template <typename Acc>
__device__ __forceinline__ ElementGrad<Acc> element_grad(Acc x, Acc dy, Acc mean,
                                                         const PlaneGate<Acc>& g) {
  ElementGrad<Acc> r;
  r.xc = x - mean;
  r.s = sigmoid(g.alpha * r.xc + g.beta);
  r.dt = dy * x * r.s * (Acc(1) - r.s);
  return r;
}

// dx = dy * s + alpha * dt + k0 + k1 * (x - mean), with dt = dy * x * s * (1 - s) and k0,
// k1 from the plane sums (plane_math::grad_coefficients).
template <typename T, typename Acc>
__device__ __forceinline__ T grad_x(Acc dy, const ElementGrad<Acc>& e, const PlaneGate<Acc>& g,
                                    const GradCoefficients<Acc>& k) {
  return from_acc<T>(dy * e.s + g.alpha * e.dt + k.k0 + k.k1 * e.xc);
}

// Where plane (b, c) keeps its two partial sums in the backward's workspace, laid out
// (half, B * G, 4) for the parameter-gradient kernel: with 2 * half channels per group, the
// plane's row is r = b * G + c / (2 * half), its parameter index k = c % half, and channel
// planes (c % (2 * half) < half) take values 0 and 1 of the row, spatial planes 2 and 3.
// So each parameter index's B * G rows are one contiguous run of 4-value rows, read with
// one vector load a row. Channel arithmetic is 32-bit, as in output_channel.
template <typename T>
__device__ __forceinline__ int64_t partial_slot(const BackwardParams<T>& p, int64_t b, int64_t c) {
  const int half = int(p.gate.half);
  const int groups = int(p.shape.channels) / (2 * half);
  const int g = int(c) / (2 * half);
  const int kk = int(c) - g * 2 * half;
  const int branch = kk < half ? 0 : 1;
  const int64_t rows = p.shape.batch * groups;
  return ((kk - branch * half) * rows + b * groups + g) * 4 + branch * 2;
}

// What the parameter-gradient kernel sums over (batch, group) for plane (b, c): S1 and,
// for channel planes S1 * mean, for spatial planes S2.
template <typename T, typename Acc>
__device__ __forceinline__ void write_partials(const BackwardParams<T>& p, int64_t b, int64_t c,
                                               bool spatial, Acc s1, Acc s2, Acc mean) {
  Acc* slot = p.partials + partial_slot(p, b, c);
  slot[0] = s1;
  slot[1] = spatial ? s2 : s1 * mean;
}

// ---- deterministic reductions -------------------------------------------------------
// Butterfly (xor) shuffles: every lane ends with the same bits, since a + b == b + a
// exactly; the summation order is fixed by the lane numbering alone.

template <typename Acc, int N>
__device__ __forceinline__ void warp_allreduce(Acc (&v)[N]) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(kFullMask, v[i], offset);
  }
}

// Sum over each team of TEAM consecutive threads (a warp, several warps, or the whole
// block), returned to every thread of the team. Teams of more than a warp meet in `smem`
// (kBlockWarps * N values) through two block-wide barriers: every thread of the block must
// call it, whether its team has work or not. The warps of a team are added in warp order.
template <int TEAM, typename Acc, int N>
__device__ __forceinline__ void team_allreduce(Acc (&v)[N], Acc* smem) {
  static_assert(TEAM % kWarp == 0 && kBlock % TEAM == 0, "a team is whole warps of the block");
  warp_allreduce(v);
  if constexpr (TEAM > kWarp) {
    constexpr int kTeamWarps = TEAM / kWarp;
    const int warp = threadIdx.x / kWarp;
    if (threadIdx.x % kWarp == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) smem[warp * N + i] = v[i];
    }
    __syncthreads();
    const int first = warp - warp % kTeamWarps;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      Acc total = smem[first * N + i];
#pragma unroll
      for (int w = 1; w < kTeamWarps; ++w) total += smem[(first + w) * N + i];
      v[i] = total;
    }
    __syncthreads();
  }
}

// Sum over the whole block, returned to every thread. Ends with a barrier, so the caller
// may reuse `smem` at once.
template <typename Acc, int N>
__device__ __forceinline__ void block_allreduce(Acc (&v)[N], Acc* smem) {
  team_allreduce<kBlock>(v, smem);
}

// ---- Welford / Chan statistics -----------------------------------------------------

// Count, mean and centred sum of squares of a set of values.
template <typename Acc>
struct Welford {
  Acc mean;
  Acc m2;
  int n;  // <= H * W <= INT32_MAX
};

// Chan et al.'s merge of two disjoint sets; empty sets are exact identities.
template <typename Acc>
__device__ __forceinline__ Welford<Acc> welford_merge(const Welford<Acc>& a,
                                                      const Welford<Acc>& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  const int n = a.n + b.n;
  const Acc frac_b = Acc(b.n) / Acc(n);
  const Acc delta = b.mean - a.mean;
  Welford<Acc> r;
  r.n = n;
  r.mean = a.mean + delta * frac_b;
  r.m2 = a.m2 + b.m2 + delta * delta * Acc(a.n) * frac_b;
  return r;
}

// Statistics of the first `count` of `vals`, held in registers: mean first, then the
// centred sum of squares from the same values (no E[x^2] - E[x]^2 cancellation).
template <typename Acc, int N>
__device__ __forceinline__ Welford<Acc> welford_of(const Acc (&vals)[N], int count) {
  Welford<Acc> r{Acc(0), Acc(0), count};
  if (count == 0) return r;
  Acc sum = Acc(0);
#pragma unroll
  for (int i = 0; i < N; ++i) if (i < count) sum += vals[i];
  r.mean = sum / Acc(count);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (i < count) {
      const Acc d = vals[i] - r.mean;
      r.m2 += d * d;
    }
  }
  return r;
}

template <typename Acc>
__device__ __forceinline__ Welford<Acc> shfl_down(const Welford<Acc>& s, int offset) {
  Welford<Acc> r;
  r.mean = __shfl_down_sync(kFullMask, s.mean, offset);
  r.m2 = __shfl_down_sync(kFullMask, s.m2, offset);
  r.n = __shfl_down_sync(kFullMask, s.n, offset);
  return r;
}

// Merge over the block in a fixed tree order; every thread gets the result.
// `smem` holds kBlockWarps states. Ends with a barrier.
template <typename Acc>
__device__ __forceinline__ Welford<Acc> block_welford(Welford<Acc> s, Welford<Acc>* smem) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) s = welford_merge(s, shfl_down(s, offset));
  // Lane 0 of each warp now holds its warp's merge.
  if (threadIdx.x % kWarp == 0) smem[threadIdx.x / kWarp] = s;
  __syncthreads();
  Welford<Acc> total = smem[0];
#pragma unroll
  for (int w = 1; w < kBlockWarps; ++w) total = welford_merge(total, smem[w]);
  __syncthreads();
  return total;
}

}  // namespace detail
}  // namespace sa_kernels
