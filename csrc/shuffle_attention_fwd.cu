// Shuffle Attention forward: per-plane statistics, gate, shuffled write.
//
// Paths, chosen by the launcher from the layout and the plane size H * W:
//  * small planes staged in shared memory (shuffle_attention_staged.cuh): a block owns a
//    tile of several planes, read and written with 16-byte vectors.
//  * planes held on chip: each plane is read once into registers by a team (a warp for
//    small planes, the whole block otherwise); mean, then the centred sum of squares
//    from the held values; then the gated values are written.
//  * planes too large for one block: a thread-block cluster holds each plane
//    (shuffle_attention_plane_cluster.cuh, sm_90).
//  * two sweeps: planes too large to hold (or a strided layout): sweep 1 merges the
//    statistics chunk by chunk (Chan), sweep 2 gates and writes.
//  * channels_last: a block owns channel pairs (j, C/2 + j) of one image, whose outputs
//    2j, 2j + 1 are adjacent, and sweeps the image twice (statistics, then gate). With
//    16-byte alignment the split kernel (shuffle_attention_channels_last.cuh) does this
//    with 16-byte accesses, its positions split over a thread-block cluster (sm_90);
//    otherwise the scalar kernel below.
#include <cstdint>

#include "shuffle_attention.h"
#include "shuffle_attention_channels_last.cuh"
#include "shuffle_attention_common.cuh"
#include "shuffle_attention_plane_cluster.cuh"
#include "shuffle_attention_staged.cuh"

namespace sa_kernels {
namespace detail {

// One plane per team of TEAM threads (a warp, several warps or the whole block); each
// thread holds up to ITEMS packs of VEC elements, so a plane fits when
// H * W <= TEAM * ITEMS * VEC (checked by the launcher). Every load of a plane is issued
// before its first use.
template <typename T, int VEC, int ITEMS, int TEAM>
__global__ void __launch_bounds__(kBlock) forward_held_kernel(const ForwardParams<T> p) {
  using Acc = acc_t<T>;
  using P = Pack<T, VEC>;
  constexpr int kTeams = kBlock / TEAM;
  __shared__ Acc smem[kBlockWarps];

  const int64_t channels = p.shape.channels;
  const int64_t planes = p.shape.batch * channels;
  const int hw = int(p.shape.height * p.shape.width);
  const int packs = hw / VEC;  // VEC divides H * W (launcher)
  const int team = threadIdx.x / TEAM;
  const int rank = threadIdx.x % TEAM;

  // The loop runs the same rounds in every thread of the block (teams of several warps
  // meet at block-wide barriers); a team past the last plane idles through its round.
  for (int64_t base = int64_t(blockIdx.x) * kTeams; base < planes;
       base += int64_t(gridDim.x) * kTeams) {
    const int64_t plane = base + team;
    const int mine = plane < planes ? packs : 0;  // packs this team holds
    const int64_t b = plane / channels;
    const int64_t c = plane % channels;
    const P* x = reinterpret_cast<const P*>(p.x + b * p.x_stride.b + c * p.x_stride.c);

    P held[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (i * TEAM + rank < mine) held[i] = x[i * TEAM + rank];
    }
    Acc sum[1] = {Acc(0)};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (i * TEAM + rank < mine) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) sum[0] += to_acc(held[i].v[e]);
      }
    }
    team_allreduce<TEAM>(sum, smem);
    const Acc mean = sum[0] / Acc(hw);

    Acc m2[1] = {Acc(0)};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (i * TEAM + rank < mine) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const Acc d = to_acc(held[i].v[e]) - mean;
          m2[0] += d * d;
        }
      }
    }
    team_allreduce<TEAM>(m2, smem);
    if (mine == 0) continue;  // after the team's last barrier of this round
    const Acc rstd = inv_sqrt(m2[0] / Acc(hw) + Acc(p.eps));
    if (rank == 0) {
      p.mean[plane] = mean;
      p.rstd[plane] = rstd;
    }

    const PlaneGate<Acc> gate = plane_gate(p.gate, c, mean, rstd);
    P* out = reinterpret_cast<P*>(p.out + b * p.out_stride.b +
                                  output_channel(c, channels) * p.out_stride.c);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int v = i * TEAM + rank;
      if (v < mine) {
        P r;
#pragma unroll
        for (int e = 0; e < VEC; ++e) r.v[e] = gated<T>(to_acc(held[i].v[e]), mean, gate);
        out[v] = r;
      }
    }
  }
}

// One plane per block, any size: sweep 1 folds chunks of up to kUnroll packs per thread
// into running statistics (Chan merge), merged over the block in a fixed order; sweep 2
// reads the plane again and writes the gated values. STRIDED planes are addressed
// element by element through their H and W strides.
template <typename T, int VEC, bool STRIDED>
__global__ void __launch_bounds__(kBlock) forward_two_sweep_kernel(const ForwardParams<T> p) {
  using Acc = acc_t<T>;
  using IO = PlaneIO<T, VEC, STRIDED>;
  using P = typename IO::P;
  constexpr int kUnroll = 4;
  constexpr int64_t kStep = int64_t(kBlock) * kUnroll;
  __shared__ Welford<Acc> smem[kBlockWarps];

  const int64_t channels = p.shape.channels;
  const int64_t planes = p.shape.batch * channels;
  const int width = int(p.shape.width);
  const int64_t hw = p.shape.height * p.shape.width;
  const int64_t packs = hw / VEC;  // VEC divides H * W (launcher)

  for (int64_t plane = blockIdx.x; plane < planes; plane += gridDim.x) {  // block-uniform
    const int64_t b = plane / channels;
    const int64_t c = plane % channels;
    const T* x = p.x + b * p.x_stride.b + c * p.x_stride.c;

    Welford<Acc> stats{Acc(0), Acc(0), 0};
    for (int64_t v0 = threadIdx.x; v0 < packs; v0 += kStep) {
      // Packs v0 + u * kBlock increase with u, so the valid ones are a prefix.
      Acc vals[kUnroll * VEC];
      int count = 0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + int64_t(u) * kBlock;
        if (v < packs) {
          const P pack = IO::load(x, v, width, p.x_stride);
#pragma unroll
          for (int e = 0; e < VEC; ++e) vals[u * VEC + e] = to_acc(pack.v[e]);
          count += VEC;
        }
      }
      stats = welford_merge(stats, welford_of(vals, count));
    }
    stats = block_welford(stats, smem);
    const Acc mean = stats.mean;
    const Acc rstd = inv_sqrt(stats.m2 / Acc(hw) + Acc(p.eps));
    if (threadIdx.x == 0) {
      p.mean[plane] = mean;
      p.rstd[plane] = rstd;
    }

    const PlaneGate<Acc> gate = plane_gate(p.gate, c, mean, rstd);
    T* out = p.out + b * p.out_stride.b + output_channel(c, channels) * p.out_stride.c;
    for (int64_t v0 = threadIdx.x; v0 < packs; v0 += kStep) {
      P in[kUnroll];
      IO::load_unrolled(in, x, v0, kBlock, packs, width, p.x_stride);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + int64_t(u) * kBlock;
        if (v < packs) {
          P r;
#pragma unroll
          for (int e = 0; e < VEC; ++e) r.v[e] = gated<T>(to_acc(in[u].v[e]), mean, gate);
          IO::store(out, v, r, width, p.out_stride);
        }
      }
    }
  }
}

// channels_last x and out: element (b, c, h, w) at (b * H * W + h * W + w) * C + c.
// A block owns kPairs channel pairs of one image: thread (row, lane) handles pair
// j = tile * kPairs + lane, i.e. input channels j and C/2 + j, at positions row,
// row + kRows, ... The outputs 2j, 2j + 1 are adjacent: one 2-element store.
template <typename T>
__global__ void __launch_bounds__(kBlock) forward_channels_last_kernel(const ForwardParams<T> p) {
  using Acc = acc_t<T>;
  constexpr int kPairs = kChannelsLastPairs<T>;
  constexpr int kRows = kBlock / kPairs;
  constexpr int kUnroll = 4;
  constexpr int64_t kStep = int64_t(kRows) * kUnroll;
  __shared__ Welford<Acc> partial[2][kRows][kPairs];
  __shared__ Acc plane_mean[2][kPairs];
  __shared__ PlaneGate<Acc> plane_gates[2][kPairs];

  const int lane = threadIdx.x % kPairs;
  const int row = threadIdx.x / kPairs;
  const int64_t channels = p.shape.channels;
  const int64_t half_c = channels / 2;
  const int64_t hw = p.shape.height * p.shape.width;
  const int64_t tiles = ceil_div(half_c, kPairs);

  // The loop condition is uniform over the block.
  for (int64_t work = blockIdx.x; work < p.shape.batch * tiles; work += gridDim.x) {
    const int64_t b = work / tiles;
    const int64_t j = (work % tiles) * kPairs + lane;
    const bool active = j < half_c;  // inactive lanes still reach every barrier
    const T* x = p.x + b * hw * channels;

    // Sweep 1: statistics of channels j (i = 0) and C/2 + j (i = 1) over this thread's rows.
    Welford<Acc> stats[2] = {{Acc(0), Acc(0), 0}, {Acc(0), Acc(0), 0}};
    if (active) {
      for (int64_t r0 = row; r0 < hw; r0 += kStep) {
        Acc v0[kUnroll], v1[kUnroll];
        int count = 0;  // valid rows are a prefix of u
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t r = r0 + int64_t(u) * kRows;
          if (r < hw) {
            v0[u] = to_acc(x[r * channels + j]);
            v1[u] = to_acc(x[r * channels + half_c + j]);
            ++count;
          }
        }
        stats[0] = welford_merge(stats[0], welford_of(v0, count));
        stats[1] = welford_merge(stats[1], welford_of(v1, count));
      }
    }
    partial[0][row][lane] = stats[0];
    partial[1][row][lane] = stats[1];
    __syncthreads();

    // Rows 0 and 1 merge channel i = row over all rows, in row order.
    if (row < 2 && active) {
      const int i = row;
      Welford<Acc> s = partial[i][0][lane];
      for (int r = 1; r < kRows; ++r) s = welford_merge(s, partial[i][r][lane]);
      const int64_t c = i * half_c + j;
      const Acc mean = s.mean;
      const Acc rstd = inv_sqrt(s.m2 / Acc(hw) + Acc(p.eps));
      p.mean[b * channels + c] = mean;
      p.rstd[b * channels + c] = rstd;
      plane_mean[i][lane] = mean;
      plane_gates[i][lane] = plane_gate(p.gate, c, mean, rstd);
    }
    __syncthreads();

    // Sweep 2: gate both channels and write them as one pair at output channel 2j.
    if (active) {
      const Acc mean0 = plane_mean[0][lane], mean1 = plane_mean[1][lane];
      const PlaneGate<Acc> gate0 = plane_gates[0][lane], gate1 = plane_gates[1][lane];
      T* out = p.out + b * hw * channels;
      for (int64_t r0 = row; r0 < hw; r0 += kStep) {
        T in0[kUnroll], in1[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t r = r0 + int64_t(u) * kRows;
          if (r < hw) {
            in0[u] = x[r * channels + j];
            in1[u] = x[r * channels + half_c + j];
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t r = r0 + int64_t(u) * kRows;
          if (r < hw) {
            store_pair(out + r * channels + 2 * j,  // aligned: checked by the launcher
                       gated<T>(to_acc(in0[u]), mean0, gate0),
                       gated<T>(to_acc(in1[u]), mean1, gate1));
          }
        }
      }
    }
    // No barrier needed before the next work item: it writes `partial` only after every
    // thread has passed the second barrier above (so its readers are done), and the
    // per-lane values read in sweep 2 only after everyone passed its own first barrier.
  }
}

}  // namespace detail

template <typename T>
cudaError_t shuffle_attention_forward(const ForwardParams<T>& p, cudaStream_t stream) {
  using namespace detail;
  const Shape4& n = p.shape;
  const int64_t hw = n.height * n.width;
  const int64_t planes = n.batch * n.channels;
  if (planes * hw == 0) return cudaSuccess;
  if (hw > INT32_MAX || n.channels > INT32_MAX || p.gate.half < 1 ||
      n.channels % (2 * p.gate.half) != 0) {
    return cudaErrorInvalidValue;
  }

  if (plane_is_contiguous(p.x_stride, n) && plane_is_contiguous(p.out_stride, n)) {
    constexpr int V = kVec16<T>;
    const bool vec = planes_vector_aligned(p.x, p.x_stride, n, V) &&
                     planes_vector_aligned(p.out, p.out_stride, n, V);
    const bool held = p.register_plane_limit < 0 || hw <= p.register_plane_limit;
    const Variant variant = Variant::decode(p.variant);
    const bool may_stage =
        variant.planes == Variant::kPlanesAuto || variant.planes == Variant::kPlanesStaged;
    if (held && may_stage &&
        staged_layout(p.x, p.x_stride, n, V) && staged_layout(p.out, p.out_stride, n, V)) {
      const StagedTiling tiling = staged_plan<T>(n);
      if (tiling.run > 0) return launch(forward_staged_kernel<T>, n.batch * tiling.tiles, stream, p);
    }
    // Held configurations, smallest first: a team of TEAM threads holding ITEMS packs of
    // VEC elements fits a plane of H * W <= TEAM * ITEMS * VEC. With 16-byte packs the
    // smallest team that fits a plane in 8 packs a thread: threads hold 4 to 8 packs, all
    // in flight at once (the held bytes per register, hence per multiprocessor, stay high).
    // Planes larger than a block holds: a cluster of blocks holds them (sm_90).
    const int64_t packs = hw / V;
    if (held && vec) {
      const int blocks = plane_cluster_blocks(planes, packs, int64_t(kBlock) * 16, variant,
                                              max_cluster_blocks(forward_plane_cluster_kernel<T>));
      if (blocks > 0) {
        return launch_cluster(forward_plane_cluster_kernel<T>, planes, blocks, stream, p);
      }
    }
    const auto per_team = [&](auto kernel, int team) {  // kBlock / team planes a block
      return launch(kernel, ceil_div(planes, kBlock / team), stream, p);
    };
    const auto per_warp = [&](auto kernel) { return per_team(kernel, kWarp); };
    const auto per_block = [&](auto kernel) { return per_team(kernel, kBlock); };
    if (held && hw <= kWarp * 2) return per_warp(forward_held_kernel<T, 1, 2, kWarp>);
    if (held && hw <= kWarp * 8) return per_warp(forward_held_kernel<T, 1, 8, kWarp>);
    if (held && vec) {
      if (packs <= 32 * 8) return per_team(forward_held_kernel<T, V, 8, 32>, 32);
      if (packs <= 64 * 8) return per_team(forward_held_kernel<T, V, 8, 64>, 64);
      if (packs <= 128 * 8) return per_team(forward_held_kernel<T, V, 8, 128>, 128);
      if (packs <= 256 * 8) return per_team(forward_held_kernel<T, V, 8, 256>, 256);
      if (packs <= 256 * 16) return per_team(forward_held_kernel<T, V, 16, 256>, 256);
    }
    if (held && !vec && hw <= kBlock * 4) return per_block(forward_held_kernel<T, 1, 4, kBlock>);
    if (held && !vec && hw <= kBlock * 16) return per_block(forward_held_kernel<T, 1, 16, kBlock>);
    return vec ? per_block(forward_two_sweep_kernel<T, V, false>)
               : per_block(forward_two_sweep_kernel<T, 1, false>);
  }

  if (split_layout<T>(p.x, p.x_stride, n) && split_layout<T>(p.out, p.out_stride, n)) {
    return launch_split<T>(forward_channels_last_split_kernel<T>, p, Variant::decode(p.variant).cluster,
                           stream);
  }
  const bool pair_aligned = reinterpret_cast<uintptr_t>(p.out) % (2 * sizeof(T)) == 0;
  if (is_channels_last(p.x_stride, n) && is_channels_last(p.out_stride, n) && pair_aligned) {
    const int64_t tiles = ceil_div(n.channels / 2, kChannelsLastPairs<T>);
    return launch(forward_channels_last_kernel<T>, n.batch * tiles, stream, p);
  }

  // Any other layout (e.g. a dense permutation that empty_like preserves, or a slice):
  // element-wise strided addressing, two sweeps.
  return launch(forward_two_sweep_kernel<T, 1, true>, planes, stream, p);
}

template cudaError_t shuffle_attention_forward<float>(const ForwardParams<float>&, cudaStream_t);
template cudaError_t shuffle_attention_forward<double>(const ForwardParams<double>&, cudaStream_t);
template cudaError_t shuffle_attention_forward<__half>(const ForwardParams<__half>&, cudaStream_t);
template cudaError_t shuffle_attention_forward<__nv_bfloat16>(const ForwardParams<__nv_bfloat16>&,
                                                               cudaStream_t);

}  // namespace sa_kernels
