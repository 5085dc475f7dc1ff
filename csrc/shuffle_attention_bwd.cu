// Shuffle Attention backward: dx per plane, then the six parameter gradients.
//
// Launch 1 (one of four paths, as in the forward): per plane, recompute the gate from
// x and the saved (mean, rstd), reduce S1 = sum(dt) and S2 = sum(dt * xhat), write dx
// and the plane's two partial sums to a workspace (partial_slot).
// Launch 2: a team (a warp, or the whole block) per parameter index sums the partials
// over (batch, group) in a fixed order (no atomics: bitwise reproducible) and writes the
// six gradients.
// grad_out is read at the output channel o(c) of input plane c.
#include <cstdint>

#include "shuffle_attention.h"
#include "shuffle_attention_channels_last.cuh"
#include "shuffle_attention_common.cuh"
#include "shuffle_attention_plane_cluster.cuh"
#include "shuffle_attention_staged.cuh"

namespace sa_kernels {
namespace detail {

// One plane per team of TEAM threads (a warp, several warps or the whole block) holding
// up to ITEMS packs of VEC elements of both x and grad_out: H * W <= TEAM * ITEMS * VEC
// (launcher). Each is read once, every load issued before the first use.
template <typename T, int VEC, int ITEMS, int TEAM>
__global__ void __launch_bounds__(kBlock) backward_held_kernel(const BackwardParams<T> p) {
  using Acc = acc_t<T>;
  using P = Pack<T, VEC>;
  constexpr int kTeams = kBlock / TEAM;
  __shared__ Acc smem[kBlockWarps * 2];

  const int64_t channels = p.shape.channels;
  const int64_t planes = p.shape.batch * channels;
  const int hw = int(p.shape.height * p.shape.width);
  const int packs = hw / VEC;  // VEC divides H * W (launcher)
  const Acc inv_n = Acc(1) / Acc(hw);
  const int team = threadIdx.x / TEAM;
  const int rank = threadIdx.x % TEAM;

  // The same rounds in every thread of the block, as in the forward.
  for (int64_t base = int64_t(blockIdx.x) * kTeams; base < planes;
       base += int64_t(gridDim.x) * kTeams) {
    const int64_t plane = base + team;
    const int mine = plane < planes ? packs : 0;  // packs this team holds
    const int64_t b = plane / channels;
    const int64_t c = plane % channels;
    const int64_t o = output_channel(c, channels);
    const P* x = reinterpret_cast<const P*>(p.x + b * p.x_stride.b + c * p.x_stride.c);
    const P* dy = reinterpret_cast<const P*>(p.grad_out + b * p.grad_out_stride.b +
                                             o * p.grad_out_stride.c);

    P held_x[ITEMS], held_dy[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int v = i * TEAM + rank;
      if (v < mine) {
        held_x[i] = x[v];
        held_dy[i] = dy[v];
      }
    }
    Acc mean = Acc(0), rstd = Acc(0);
    PlaneGate<Acc> gate{Acc(0), Acc(0), false, 0};
    if (mine > 0) {
      mean = p.mean[plane];
      rstd = p.rstd[plane];
      gate = plane_gate(p.gate, c, mean, rstd);
    }
    Acc sums[2] = {Acc(0), Acc(0)};  // sum(dt), sum(dt * (x - mean))
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (i * TEAM + rank < mine) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const ElementGrad<Acc> g =
              element_grad(to_acc(held_x[i].v[e]), to_acc(held_dy[i].v[e]), mean, gate);
          sums[0] += g.dt;
          sums[1] += g.dt * g.xc;
        }
      }
    }
    team_allreduce<TEAM>(sums, smem);
    if (mine == 0) continue;  // after the team's last barrier of this round
    const Acc s1 = sums[0];
    const Acc s2 = sums[1] * rstd;
    if (rank == 0) write_partials(p, b, c, gate.spatial, s1, s2, mean);

    const GradCoefficients<Acc> k = grad_coefficients(p.gate, gate, rstd, s1, s2, inv_n);
    P* dx = reinterpret_cast<P*>(p.grad_x + b * p.grad_x_stride.b + c * p.grad_x_stride.c);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int v = i * TEAM + rank;
      if (v < mine) {
        P r;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const Acc dye = to_acc(held_dy[i].v[e]);
          const ElementGrad<Acc> g = element_grad(to_acc(held_x[i].v[e]), dye, mean, gate);
          r.v[e] = grad_x<T>(dye, g, gate, k);
        }
        dx[v] = r;
      }
    }
  }
}

// One plane per block, any size: sweep 1 reduces S1, S2; sweep 2 reads x and grad_out
// again and writes dx. STRIDED planes are addressed element by element.
template <typename T, int VEC, bool STRIDED>
__global__ void __launch_bounds__(kBlock) backward_two_sweep_kernel(const BackwardParams<T> p) {
  using Acc = acc_t<T>;
  using IO = PlaneIO<T, VEC, STRIDED>;
  using P = typename IO::P;
  constexpr int kUnroll = 4;
  constexpr int64_t kStep = int64_t(kBlock) * kUnroll;
  __shared__ Acc smem[kBlockWarps * 2];

  const int64_t channels = p.shape.channels;
  const int64_t planes = p.shape.batch * channels;
  const int width = int(p.shape.width);
  const int64_t hw = p.shape.height * p.shape.width;
  const int64_t packs = hw / VEC;  // VEC divides H * W (launcher)
  const Acc inv_n = Acc(1) / Acc(hw);

  for (int64_t plane = blockIdx.x; plane < planes; plane += gridDim.x) {  // block-uniform
    const int64_t b = plane / channels;
    const int64_t c = plane % channels;
    const int64_t o = output_channel(c, channels);
    const Acc mean = p.mean[plane];
    const Acc rstd = p.rstd[plane];
    const PlaneGate<Acc> gate = plane_gate(p.gate, c, mean, rstd);
    const T* x = p.x + b * p.x_stride.b + c * p.x_stride.c;
    const T* dy = p.grad_out + b * p.grad_out_stride.b + o * p.grad_out_stride.c;

    Acc sums[2] = {Acc(0), Acc(0)};  // sum(dt), sum(dt * (x - mean))
    for (int64_t v0 = threadIdx.x; v0 < packs; v0 += kStep) {
      P in_x[kUnroll], in_dy[kUnroll];
      IO::load_unrolled(in_x, x, v0, kBlock, packs, width, p.x_stride);
      IO::load_unrolled(in_dy, dy, v0, kBlock, packs, width, p.grad_out_stride);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (v0 + int64_t(u) * kBlock < packs) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const ElementGrad<Acc> g =
                element_grad(to_acc(in_x[u].v[e]), to_acc(in_dy[u].v[e]), mean, gate);
            sums[0] += g.dt;
            sums[1] += g.dt * g.xc;
          }
        }
      }
    }
    block_allreduce(sums, smem);
    const Acc s1 = sums[0];
    const Acc s2 = sums[1] * rstd;
    if (threadIdx.x == 0) write_partials(p, b, c, gate.spatial, s1, s2, mean);

    const GradCoefficients<Acc> k = grad_coefficients(p.gate, gate, rstd, s1, s2, inv_n);
    T* dx = p.grad_x + b * p.grad_x_stride.b + c * p.grad_x_stride.c;
    for (int64_t v0 = threadIdx.x; v0 < packs; v0 += kStep) {
      P in_x[kUnroll], in_dy[kUnroll];
      IO::load_unrolled(in_x, x, v0, kBlock, packs, width, p.x_stride);
      IO::load_unrolled(in_dy, dy, v0, kBlock, packs, width, p.grad_out_stride);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + int64_t(u) * kBlock;
        if (v < packs) {
          P r;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const Acc dye = to_acc(in_dy[u].v[e]);
            const ElementGrad<Acc> g = element_grad(to_acc(in_x[u].v[e]), dye, mean, gate);
            r.v[e] = grad_x<T>(dye, g, gate, k);
          }
          IO::store(dx, v, r, width, p.grad_x_stride);
        }
      }
    }
  }
}

// Rows r0, r0 + kRows, ... (kUnroll of them, those at or past hw left alone) of a
// channels_last pair: x at channels j and C/2 + j, grad_out at the adjacent 2j, 2j + 1
// (one aligned pair load: checked by the launcher). All loads issued before any use.
template <int kUnroll, int kRows, typename T>
__device__ __forceinline__ void load_channels_last_rows(T (&in_x)[2][kUnroll], T (&in_dy)[2][kUnroll],
                                                        const T* x, const T* dy, int64_t r0,
                                                        int64_t hw, int64_t channels,
                                                        int64_t half_c, int64_t j) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t r = r0 + int64_t(u) * kRows;
    if (r < hw) {
      in_x[0][u] = x[r * channels + j];
      in_x[1][u] = x[r * channels + half_c + j];
      load_pair(dy + r * channels + 2 * j, in_dy[0][u], in_dy[1][u]);
    }
  }
}

// channels_last x, grad_out and grad_x (element (b, c, h, w) at (b * H * W + h * W + w)
// * C + c). A block owns kPairs channel pairs (j, C/2 + j) of one image, as in the
// forward; their grad_out channels 2j, 2j + 1 are adjacent and read as one pair.
template <typename T>
__global__ void __launch_bounds__(kBlock) backward_channels_last_kernel(const BackwardParams<T> p) {
  using Acc = acc_t<T>;
  constexpr int kPairs = kChannelsLastPairs<T>;
  constexpr int kRows = kBlock / kPairs;
  constexpr int kUnroll = 4;
  constexpr int64_t kStep = int64_t(kRows) * kUnroll;
  __shared__ Acc partial[2][2][kRows][kPairs];  // [channel i][S1, S2 part][row][lane]
  __shared__ GradCoefficients<Acc> coefficients[2][kPairs];

  const int lane = threadIdx.x % kPairs;
  const int row = threadIdx.x / kPairs;
  const int64_t channels = p.shape.channels;
  const int64_t half_c = channels / 2;
  const int64_t hw = p.shape.height * p.shape.width;
  const Acc inv_n = Acc(1) / Acc(hw);
  const int64_t tiles = ceil_div(half_c, kPairs);

  // The loop condition is uniform over the block.
  for (int64_t work = blockIdx.x; work < p.shape.batch * tiles; work += gridDim.x) {
    const int64_t b = work / tiles;
    const int64_t j = (work % tiles) * kPairs + lane;
    const bool active = j < half_c;  // inactive lanes still reach every barrier
    const int64_t base = b * hw * channels;
    const T* x = p.x + base;
    const T* dy = p.grad_out + base;

    // Input channel i * C/2 + j: its statistics and gate (set and read by active lanes only).
    Acc mean[2] = {Acc(0), Acc(0)}, rstd[2] = {Acc(0), Acc(0)};
    PlaneGate<Acc> gate[2];
    if (active) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int64_t plane = b * channels + i * half_c + j;
        mean[i] = p.mean[plane];
        rstd[i] = p.rstd[plane];
        gate[i] = plane_gate(p.gate, i * half_c + j, mean[i], rstd[i]);
      }
    }

    // Sweep 1: this thread's part of S1 and sum(dt * (x - mean)) for both channels.
    Acc sums[2][2] = {{Acc(0), Acc(0)}, {Acc(0), Acc(0)}};
    if (active) {
      for (int64_t r0 = row; r0 < hw; r0 += kStep) {
        T in_x[2][kUnroll], in_dy[2][kUnroll];
        load_channels_last_rows<kUnroll, kRows>(in_x, in_dy, x, dy, r0, hw, channels, half_c, j);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (r0 + int64_t(u) * kRows < hw) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              const ElementGrad<Acc> g =
                  element_grad(to_acc(in_x[i][u]), to_acc(in_dy[i][u]), mean[i], gate[i]);
              sums[i][0] += g.dt;
              sums[i][1] += g.dt * g.xc;
            }
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      partial[i][0][row][lane] = sums[i][0];
      partial[i][1][row][lane] = sums[i][1];
    }
    __syncthreads();

    // Rows 0 and 1 sum channel i = row over all rows, in row order.
    if (row < 2 && active) {
      const int i = row;
      // Selected, not indexed by i: a run-time index would put the arrays in local memory.
      const Acc mean_i = i == 0 ? mean[0] : mean[1];
      const Acc rstd_i = i == 0 ? rstd[0] : rstd[1];
      const PlaneGate<Acc> gate_i = i == 0 ? gate[0] : gate[1];
      Acc s1 = partial[i][0][0][lane], s2 = partial[i][1][0][lane];
      for (int r = 1; r < kRows; ++r) {
        s1 += partial[i][0][r][lane];
        s2 += partial[i][1][r][lane];
      }
      s2 *= rstd_i;
      write_partials(p, b, i * half_c + j, gate_i.spatial, s1, s2, mean_i);
      coefficients[i][lane] = grad_coefficients(p.gate, gate_i, rstd_i, s1, s2, inv_n);
    }
    __syncthreads();

    // Sweep 2: dx of both channels.
    if (active) {
      const GradCoefficients<Acc> k[2] = {coefficients[0][lane], coefficients[1][lane]};
      T* dx = p.grad_x + base;
      for (int64_t r0 = row; r0 < hw; r0 += kStep) {
        T in_x[2][kUnroll], in_dy[2][kUnroll];
        load_channels_last_rows<kUnroll, kRows>(in_x, in_dy, x, dy, r0, hw, channels, half_c, j);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t r = r0 + int64_t(u) * kRows;
          if (r < hw) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              const Acc dye = to_acc(in_dy[i][u]);
              const ElementGrad<Acc> g = element_grad(to_acc(in_x[i][u]), dye, mean[i], gate[i]);
              dx[r * channels + i * half_c + j] = grad_x<T>(dye, g, gate[i], k[i]);
            }
          }
        }
      }
    }
    // No barrier needed before the next work item: it writes `partial` only after every
    // thread has passed the second barrier above (so its readers are done), and the
    // per-lane values read in sweep 2 only after everyone passed its own first barrier.
  }
}

// Rows of partials each thread of the parameter-gradient kernel loads before adding any.
constexpr int kParamUnroll = 8;

// A team of TEAM threads per parameter index k (a warp, or the whole block) sums its
// B * G rows of partials (partial_slot: one contiguous run of 4-value rows): thread
// `rank` adds rows rank, rank + TEAM, ... in increasing order, kUnroll vector loads in
// flight at a time, then a fixed tree over the team. The order depends on TEAM only,
// never on the grid: bitwise reproducible.
template <typename T, int TEAM>
__global__ void __launch_bounds__(kBlock) param_grad_kernel(const BackwardParams<T> p) {
  using Acc = acc_t<T>;
  using Row = Pack<Acc, 4>;  // channel S1, channel S1 * mean, spatial S1, spatial S2
  constexpr int kTeams = kBlock / TEAM;
  constexpr int kUnroll = kParamUnroll;
  __shared__ Acc smem[kBlockWarps * 4];

  const int64_t half = p.gate.half;
  const int64_t rows = p.shape.batch * (int(p.shape.channels) / int(2 * half));  // 32-bit division
  const int team = threadIdx.x / TEAM;
  const int rank = threadIdx.x % TEAM;

  for (int64_t k = int64_t(blockIdx.x) * kTeams + team; k < half;
       k += int64_t(gridDim.x) * kTeams) {  // uniform over a team
    const Row* src = reinterpret_cast<const Row*>(p.partials) + k * rows;
    Acc sums[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
    for (int64_t r0 = rank; r0 < rows; r0 += int64_t(TEAM) * kUnroll) {
      Row in[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t r = r0 + int64_t(u) * TEAM;
        if (r < rows) in[u] = src[r];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (r0 + int64_t(u) * TEAM < rows) {
#pragma unroll
          for (int i = 0; i < 4; ++i) sums[i] += in[u].v[i];
        }
      }
    }
    team_allreduce<TEAM>(sums, smem);
    if (rank == 0) {
      const Acc sweight = p.gate.sweight[k];
      p.grads.cweight[k] = sums[1];
      p.grads.cbias[k] = sums[0];
      p.grads.sweight[k] = p.gate.gn_weight[k] * sums[3] + p.gate.gn_bias[k] * sums[2];
      p.grads.sbias[k] = sums[2];
      p.grads.gn_weight[k] = sweight * sums[3];
      p.grads.gn_bias[k] = sweight * sums[2];
    }
  }
}

// A block per parameter index once a warp would need more than one round of loads.
template <typename T>
cudaError_t launch_param_grads(const BackwardParams<T>& p, cudaStream_t stream) {
  constexpr int64_t kWarpRows = kWarp * kParamUnroll;  // a warp's rows per round of loads
  const int64_t rows = p.shape.batch * p.shape.channels / (2 * p.gate.half);
  const Variant v = Variant::decode(p.variant);
  const bool per_block = v.reduce == Variant::kReduceBlock ||
                         (v.reduce != Variant::kReduceWarp && rows > kWarpRows);
  if (per_block) return launch(param_grad_kernel<T, kBlock>, p.gate.half, stream, p);
  return launch(param_grad_kernel<T, kWarp>, ceil_div(p.gate.half, kBlockWarps), stream, p);
}

template <typename T>
cudaError_t launch_dx(const BackwardParams<T>& p, cudaStream_t stream) {
  const Shape4& n = p.shape;
  const int64_t hw = n.height * n.width;
  const int64_t planes = n.batch * n.channels;

  if (plane_is_contiguous(p.x_stride, n) && plane_is_contiguous(p.grad_out_stride, n) &&
      plane_is_contiguous(p.grad_x_stride, n)) {
    constexpr int V = kVec16<T>;
    const bool vec = planes_vector_aligned(p.x, p.x_stride, n, V) &&
                     planes_vector_aligned(p.grad_out, p.grad_out_stride, n, V) &&
                     planes_vector_aligned(p.grad_x, p.grad_x_stride, n, V);
    const bool held = p.register_plane_limit < 0 || hw <= p.register_plane_limit;
    const Variant variant = Variant::decode(p.variant);
    const bool may_stage =
        variant.planes == Variant::kPlanesAuto || variant.planes == Variant::kPlanesStaged;
    if (held && may_stage &&
        staged_layout(p.x, p.x_stride, n, V) && staged_layout(p.grad_out, p.grad_out_stride, n, V) &&
        staged_layout(p.grad_x, p.grad_x_stride, n, V)) {
      const StagedTiling tiling = staged_plan<T>(n);
      if (tiling.run > 0) return launch(backward_staged_kernel<T>, n.batch * tiling.tiles, stream, p);
    }
    // As in the forward; two tensors are held here, so at most 8 packs of each.
    const int64_t packs = hw / V;
    if (held && vec) {
      const int blocks = plane_cluster_blocks(planes, packs, int64_t(kBlock) * 8, variant,
                                              max_cluster_blocks(backward_plane_cluster_kernel<T>));
      if (blocks > 0) {
        return launch_cluster(backward_plane_cluster_kernel<T>, planes, blocks, stream, p);
      }
    }
    const auto per_team = [&](auto kernel, int team) {  // kBlock / team planes a block
      return launch(kernel, ceil_div(planes, kBlock / team), stream, p);
    };
    const auto per_warp = [&](auto kernel) { return per_team(kernel, kWarp); };
    const auto per_block = [&](auto kernel) { return per_team(kernel, kBlock); };
    if (held && hw <= kWarp * 2) return per_warp(backward_held_kernel<T, 1, 2, kWarp>);
    if (held && hw <= kWarp * 8) return per_warp(backward_held_kernel<T, 1, 8, kWarp>);
    if (held && vec) {
      if (packs <= 32 * 8) return per_team(backward_held_kernel<T, V, 8, 32>, 32);
      if (packs <= 64 * 8) return per_team(backward_held_kernel<T, V, 8, 64>, 64);
      if (packs <= 128 * 8) return per_team(backward_held_kernel<T, V, 8, 128>, 128);
      if (packs <= 256 * 8) return per_team(backward_held_kernel<T, V, 8, 256>, 256);
    }
    if (held && !vec && hw <= kBlock * 4) return per_block(backward_held_kernel<T, 1, 4, kBlock>);
    if (held && !vec && hw <= kBlock * 8) return per_block(backward_held_kernel<T, 1, 8, kBlock>);
    return vec ? per_block(backward_two_sweep_kernel<T, V, false>)
               : per_block(backward_two_sweep_kernel<T, 1, false>);
  }

  if (split_layout<T>(p.x, p.x_stride, n) && split_layout<T>(p.grad_out, p.grad_out_stride, n) &&
      split_layout<T>(p.grad_x, p.grad_x_stride, n)) {
    return launch_split<T>(backward_channels_last_split_kernel<T>, p,
                           Variant::decode(p.variant).cluster, stream);
  }
  const bool pair_aligned = reinterpret_cast<uintptr_t>(p.grad_out) % (2 * sizeof(T)) == 0;
  if (is_channels_last(p.x_stride, n) && is_channels_last(p.grad_out_stride, n) &&
      is_channels_last(p.grad_x_stride, n) && pair_aligned) {
    const int64_t tiles = ceil_div(n.channels / 2, kChannelsLastPairs<T>);
    return launch(backward_channels_last_kernel<T>, n.batch * tiles, stream, p);
  }

  // Any other combination of layouts (e.g. grad_out expanded from a scalar, or a
  // channels_last x with a contiguous grad_out): element-wise strided addressing.
  return launch(backward_two_sweep_kernel<T, 1, true>, planes, stream, p);
}

}  // namespace detail

template <typename T>
cudaError_t shuffle_attention_backward(const BackwardParams<T>& p, cudaStream_t stream) {
  using namespace detail;
  const Shape4& n = p.shape;
  const int64_t hw = n.height * n.width;
  if (n.batch * n.channels * hw == 0) return cudaSuccess;
  if (hw > INT32_MAX || n.channels > INT32_MAX || p.gate.half < 1 ||
      n.channels % (2 * p.gate.half) != 0) {
    return cudaErrorInvalidValue;
  }
  const cudaError_t err = launch_dx(p, stream);
  if (err != cudaSuccess) return err;
  return launch_param_grads(p, stream);
}

template cudaError_t shuffle_attention_backward<float>(const BackwardParams<float>&, cudaStream_t);
template cudaError_t shuffle_attention_backward<double>(const BackwardParams<double>&,
                                                         cudaStream_t);
template cudaError_t shuffle_attention_backward<__half>(const BackwardParams<__half>&,
                                                         cudaStream_t);
template cudaError_t shuffle_attention_backward<__nv_bfloat16>(const BackwardParams<__nv_bfloat16>&,
                                                                cudaStream_t);

}  // namespace sa_kernels
