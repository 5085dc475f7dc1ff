// channels_last with 16-byte accesses, the H * W positions of each channel tile split over
// the blocks of a thread-block cluster (sm_90), forward and backward ("split" kernels).
//
// Element (b, c, h, w) sits at ((b * H + h) * W + w) * C + c. A work item is one image b
// and a tile of kPairs channel pairs (j, C/2 + j), whose outputs 2j, 2j + 1 are adjacent.
// Thread (row, lane) loads, for each of its positions, 16 bytes of the first channel half
// (kVP consecutive pairs) and 16 bytes of the second, and stores the 2 kVP interleaved
// outputs as two 16-byte packs. The item's positions are split over the N blocks of a
// cluster (N = 1: no cluster, a block sweeps the whole image; the only form on sm_80):
// each block reduces its positions (Welford merges in a fixed order: rows within a warp by
// a shuffle tree, warps in warp order), publishes the partial in shared memory, and after
// cluster.sync() every block merges all N partials through distributed shared memory in
// rank order 0..N-1, so every block holds the same bits. A second cluster.sync() keeps the
// partials until every block has read them. Then each block writes its own positions.
//
// x is read twice (statistics, then output): from L2 where a block's positions still sit
// there. One launch, no atomics, bitwise reproducible for a given N.
#pragma once

#include <cstdint>

#include "shuffle_attention.h"
#include "shuffle_attention_cluster.cuh"
#include "shuffle_attention_common.cuh"

namespace sa_kernels {
namespace detail {

template <typename T>
struct SplitTiling {
  static constexpr int kVP = kVec16<T>;           // pairs a thread loads per position
  static constexpr int kLanes = 2;                // threads across a tile's pairs
  static constexpr int kPairs = kLanes * kVP;     // pairs a tile: 32 bytes of each half a position
  static constexpr int kRows = kBlock / kLanes;   // positions a block sweeps at once
  // Positions a thread loads before using any: forward (x), backward (x and grad_out). Chosen
  // by ptxas -v (sm_90): 2 in the backward took 156-172 registers (one block a multiprocessor).
  static constexpr int kUnrollForward = 2;
  static constexpr int kUnrollBackward = 1;
  static constexpr int kChannels = 2 * kPairs;    // channels a tile: i * kPairs + pair
};

// What the split kernels need: channels_last tensors, 16-byte aligned, and C/2 a multiple
// of kVP (each lane's 16 bytes lie within one channel half and within C/2).
template <typename T>
inline bool split_layout(const void* ptr, const Strides4& s, const Shape4& n) {
  return is_channels_last(s, n) && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 &&
         (n.channels / 2) % SplitTiling<T>::kVP == 0;
}

// This block's positions [begin, end) of an image of hw positions split over `blocks`.
struct PositionRange {
  int64_t begin, end;
};

__device__ __forceinline__ PositionRange block_positions(int64_t hw, unsigned blocks,
                                                         unsigned rank) {
  const int64_t chunk = ceil_div(hw, int64_t(blocks));
  const int64_t begin = int64_t(rank) * chunk < hw ? int64_t(rank) * chunk : hw;
  return {begin, begin + chunk < hw ? begin + chunk : hw};
}

// Positions r0, r0 + kRows, ... (U of them; those at or past `end` left alone) of the two
// 16-byte halves at channel offsets j and C/2 + j. All loads issued before any use.
template <typename T, int U, typename P = Pack<T, kVec16<T>>>
__device__ __forceinline__ int load_split_rows(P (&v)[2][U], const T* image, int64_t r0, int64_t end,
                                               int64_t channels, int64_t half_c, int64_t j) {
  int count = 0;  // valid positions: a prefix of u
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t r = r0 + int64_t(u) * SplitTiling<T>::kRows;
    if (r < end) {
      v[0][u] = *reinterpret_cast<const P*>(image + r * channels + j);
      v[1][u] = *reinterpret_cast<const P*>(image + r * channels + half_c + j);
      ++count;
    }
  }
  return count;
}

// Running statistics of K channels over the same positions: one count, so a merge takes
// one division for all K (Chan's merge of Welford states, as welford_merge). A merge
// starts with `weights(count)`, then folds each channel in (channel by channel, so only
// one channel's temporaries are live at a time), then `commit(count)`.
template <typename Acc, int K>
struct SharedCountStats {
  Acc mean[K], m2[K];
  int n;

  struct Weights {
    Acc frac;   // count / (n + count)
    Acc cross;  // n * count / (n + count)
  };

  __device__ __forceinline__ void reset() {
#pragma unroll
    for (int k = 0; k < K; ++k) mean[k] = m2[k] = Acc(0);
    n = 0;
  }

  __device__ __forceinline__ Weights weights(int count) const {
    const Acc frac = Acc(count) / Acc(n + count);
    return {frac, Acc(n) * frac};
  }

  // Channel k's new positions: their mean and centred sum of squares.
  __device__ __forceinline__ void fold(int k, Acc b_mean, Acc b_m2, const Weights& w) {
    const Acc delta = b_mean - mean[k];
    mean[k] += delta * w.frac;
    m2[k] += b_m2 + delta * delta * w.cross;
  }

  __device__ __forceinline__ void commit(int count) { n += count; }

  // Merges the state of the lane `offset` above (a shuffle tree: lane 0 of each group ends
  // with the group's statistics). Every lane takes part.
  __device__ __forceinline__ void merge_down(int offset) {
    const int count = __shfl_down_sync(kFullMask, n, offset);
    const Weights w = weights(count > 0 ? count : 1);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const Acc b_mean = __shfl_down_sync(kFullMask, mean[k], offset);
      const Acc b_m2 = __shfl_down_sync(kFullMask, m2[k], offset);
      if (count > 0) fold(k, b_mean, b_m2, w);
    }
    commit(count);
  }
};

template <typename Acc, int N>
struct SplitForwardShared {
  Welford<Acc> warp_stats[kBlockWarps][N];  // per warp, channel i * kPairs + pair
  Welford<Acc> block_stats[N];              // this block's positions; read by the cluster
  Acc mean[N], alpha[N], beta[N];
};

template <typename T>
__global__ void __launch_bounds__(kBlock) forward_channels_last_split_kernel(const ForwardParams<T> p) {
  using Acc = acc_t<T>;
  using S = SplitTiling<T>;
  constexpr int VP = S::kVP;
  using P = Pack<T, VP>;
  constexpr int kUnroll = S::kUnrollForward;
  auto& sh = block_shared<SplitForwardShared<Acc, S::kChannels>>();
  const ClusterGroup cluster = cluster_group();
  const unsigned blocks = cluster.num_blocks();
  const unsigned rank = cluster.block_rank();

  const int lane = threadIdx.x % S::kLanes;
  const int row = threadIdx.x / S::kLanes;
  const int warp = threadIdx.x / kWarp;
  const int64_t channels = p.shape.channels;
  const int64_t half_c = channels / 2;
  const int64_t hw = p.shape.height * p.shape.width;
  const int64_t tiles = ceil_div(half_c, S::kPairs);
  const PositionRange mine = block_positions(hw, blocks, rank);
  const int64_t clusters = gridDim.x / blocks;

  // Uniform over the cluster: every block of a cluster takes the same items.
  for (int64_t item = blockIdx.x / blocks; item < p.shape.batch * tiles; item += clusters) {
    const int64_t b = item / tiles;
    const int64_t tile_j = (item % tiles) * S::kPairs;
    const int64_t j = tile_j + lane * VP;
    const bool active = j < half_c;  // inactive lanes still reach every barrier
    const T* x = p.x + b * hw * channels;

    // Sweep 1: statistics of channels j + e (k = e) and C/2 + j + e (k = VP + e) over this
    // thread's positions, kUnroll at a time (their mean and centred squares first).
    SharedCountStats<Acc, 2 * VP> st;
    st.reset();
    if (active) {
      for (int64_t r0 = mine.begin + row; r0 < mine.end; r0 += int64_t(S::kRows) * kUnroll) {
        P v[2][kUnroll];
        const int count = load_split_rows<T, kUnroll>(v, x, r0, mine.end, channels, half_c, j);
        const Acc inv_count = Acc(1) / Acc(count);
        const auto w = st.weights(count);
#pragma unroll
        for (int k = 0; k < 2 * VP; ++k) {
          Acc sum = Acc(0);
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (u < count) sum += to_acc(v[k / VP][u].v[k % VP]);
          }
          const Acc b_mean = sum * inv_count;
          Acc b_m2 = Acc(0);
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (u < count) {
              const Acc d = to_acc(v[k / VP][u].v[k % VP]) - b_mean;
              b_m2 += d * d;
            }
          }
          st.fold(k, b_mean, b_m2, w);
        }
        st.commit(count);
      }
    }
    // Rows of a warp (lanes of the same `lane`), a shuffle tree: lane `lane` ends with the warp's.
#pragma unroll
    for (int offset = kWarp / 2; offset >= S::kLanes; offset /= 2) st.merge_down(offset);
    if (threadIdx.x % kWarp < S::kLanes) {
#pragma unroll
      for (int k = 0; k < 2 * VP; ++k) {
        sh.warp_stats[warp][(k / VP) * S::kPairs + lane * VP + k % VP] = {st.mean[k], st.m2[k], st.n};
      }
    }
    __syncthreads();
    const int t = threadIdx.x;  // threads t < kChannels own channel t of the tile from here
    if (t < S::kChannels) {
      Welford<Acc> s = sh.warp_stats[0][t];
      for (int w = 1; w < kBlockWarps; ++w) s = welford_merge(s, sh.warp_stats[w][t]);
      sh.block_stats[t] = s;
    }
    cluster.sync();  // every block's partials written and visible across the cluster

    if (t < S::kChannels) {
      Welford<Acc> s = *cluster.map_shared_rank(&sh.block_stats[t], 0);
      for (unsigned r = 1; r < blocks; ++r) {
        s = welford_merge(s, *cluster.map_shared_rank(&sh.block_stats[t], r));
      }
      const int i = t / S::kPairs;
      const int64_t jt = tile_j + t % S::kPairs;
      if (jt < half_c) {
        const int64_t c = i * half_c + jt;
        const Acc rstd = inv_sqrt(s.m2 / Acc(hw) + Acc(p.eps));
        if (rank == 0) {
          p.mean[b * channels + c] = s.mean;
          p.rstd[b * channels + c] = rstd;
        }
        const PlaneGate<Acc> gate = plane_gate(p.gate, c, s.mean, rstd);
        sh.mean[t] = s.mean;
        sh.alpha[t] = gate.alpha;
        sh.beta[t] = gate.beta;
      }
    }
    cluster.sync();  // every block has read the partials; the gates are visible block-wide

    // Sweep 2: gate both halves, interleave, two 16-byte stores a position.
    if (active) {
      T* out = p.out + b * hw * channels;
      for (int64_t r0 = mine.begin + row; r0 < mine.end; r0 += int64_t(S::kRows) * kUnroll) {
        P v[2][kUnroll];
        load_split_rows<T, kUnroll>(v, x, r0, mine.end, channels, half_c, j);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t r = r0 + int64_t(u) * S::kRows;
          if (r < mine.end) {
            P o[2];
#pragma unroll
            for (int e = 0; e < VP; ++e) {
#pragma unroll
              for (int i = 0; i < 2; ++i) {
                const int k = i * S::kPairs + lane * VP + e;
                const Acc xv = to_acc(v[i][u].v[e]);
                const T y = from_acc<T>(xv * sigmoid(sh.alpha[k] * (xv - sh.mean[k]) + sh.beta[k]));
                o[(2 * e + i) / VP].v[(2 * e + i) % VP] = y;  // output channel 2 (j + e) + i
              }
            }
            P* dst = reinterpret_cast<P*>(out + r * channels + 2 * j);
            store16(dst, o[0]);
            store16(dst + 1, o[1]);
          }
        }
      }
    }
    // No barrier before the next item: it rewrites warp_stats after the second
    // cluster.sync() above (their readers are done), block_stats and the gates only after
    // its own first cluster.sync(), which every thread reaches after this sweep.
  }
}

template <typename Acc, int N>
struct SplitBackwardShared {
  Acc warp_sums[kBlockWarps][N][2];  // per warp: sum(dt), sum(dt * (x - mean))
  Acc block_sums[N][2];              // this block's positions; read by the cluster
  Acc mean[N], alpha[N], beta[N];    // the tile's channels, from the forward's statistics
  GradCoefficients<Acc> coeff[N];
};

// At most 128 registers (two blocks a multiprocessor): without the bound, ptxas gave the
// bfloat16 instance 161 (sm_90); with it, none spills.
template <typename T>
__global__ void __launch_bounds__(kBlock, 2)
    backward_channels_last_split_kernel(const BackwardParams<T> p) {
  using Acc = acc_t<T>;
  using S = SplitTiling<T>;
  constexpr int VP = S::kVP;
  using P = Pack<T, VP>;
  constexpr int kUnroll = S::kUnrollBackward;
  auto& sh = block_shared<SplitBackwardShared<Acc, S::kChannels>>();
  const ClusterGroup cluster = cluster_group();
  const unsigned blocks = cluster.num_blocks();
  const unsigned rank = cluster.block_rank();

  const int lane = threadIdx.x % S::kLanes;
  const int row = threadIdx.x / S::kLanes;
  const int warp = threadIdx.x / kWarp;
  const int64_t channels = p.shape.channels;
  const int64_t half_c = channels / 2;
  const int64_t hw = p.shape.height * p.shape.width;
  const Acc inv_n = Acc(1) / Acc(hw);
  const int64_t tiles = ceil_div(half_c, S::kPairs);
  const PositionRange mine = block_positions(hw, blocks, rank);
  const int64_t clusters = gridDim.x / blocks;

  for (int64_t item = blockIdx.x / blocks; item < p.shape.batch * tiles; item += clusters) {
    const int64_t b = item / tiles;
    const int64_t tile_j = (item % tiles) * S::kPairs;
    const int64_t j = tile_j + lane * VP;
    const bool active = j < half_c;
    const int64_t base = b * hw * channels;
    const T* x = p.x + base;
    const T* dy = p.grad_out + base;

    // The tile's channels: statistics and gates, for every thread of the block.
    const int t = threadIdx.x;  // threads t < kChannels own channel t of the tile
    const int i_t = t / S::kPairs;
    const int64_t j_t = tile_j + t % S::kPairs;
    const bool owner = t < S::kChannels && j_t < half_c;
    const int64_t c_t = i_t * half_c + j_t;
    Acc rstd_t = Acc(0);
    PlaneGate<Acc> gate_t{Acc(0), Acc(0), false, 0};
    if (owner) {
      const Acc mean_t = p.mean[b * channels + c_t];
      rstd_t = p.rstd[b * channels + c_t];
      gate_t = plane_gate(p.gate, c_t, mean_t, rstd_t);
      sh.mean[t] = mean_t;
      sh.alpha[t] = gate_t.alpha;
      sh.beta[t] = gate_t.beta;
    }
    __syncthreads();

    // Sweep 1: sum(dt) and sum(dt * (x - mean)) over this block's positions.
    Acc sums[2][VP][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int e = 0; e < VP; ++e) sums[i][e][0] = sums[i][e][1] = Acc(0);
    }
    if (active) {
      for (int64_t r0 = mine.begin + row; r0 < mine.end; r0 += int64_t(S::kRows) * kUnroll) {
        P v[2][kUnroll], d[2][kUnroll];
        load_split_rows<T, kUnroll>(v, x, r0, mine.end, channels, half_c, j);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {  // grad_out at output channels 2j .. 2j + 2 VP - 1
          const int64_t r = r0 + int64_t(u) * S::kRows;
          if (r < mine.end) {
            const P* src = reinterpret_cast<const P*>(dy + r * channels + 2 * j);
            d[0][u] = src[0];
            d[1][u] = src[1];
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (r0 + int64_t(u) * S::kRows < mine.end) {
#pragma unroll
            for (int e = 0; e < VP; ++e) {
#pragma unroll
              for (int i = 0; i < 2; ++i) {
                const int k = i * S::kPairs + lane * VP + e;
                const int o = 2 * e + i;
                const PlaneGate<Acc> gate{sh.alpha[k], sh.beta[k], false, 0};
                const Acc dye = to_acc(d[o / VP][u].v[o % VP]);
                const ElementGrad<Acc> g = element_grad(to_acc(v[i][u].v[e]), dye, sh.mean[k], gate);
                sums[i][e][0] += g.dt;
                sums[i][e][1] += g.dt * g.xc;
              }
            }
          }
        }
      }
    }
#pragma unroll
    for (int offset = kWarp / 2; offset >= S::kLanes; offset /= 2) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int e = 0; e < VP; ++e) {
          sums[i][e][0] += __shfl_down_sync(kFullMask, sums[i][e][0], offset);
          sums[i][e][1] += __shfl_down_sync(kFullMask, sums[i][e][1], offset);
        }
      }
    }
    if (threadIdx.x % kWarp < S::kLanes) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int e = 0; e < VP; ++e) {
          sh.warp_sums[warp][i * S::kPairs + lane * VP + e][0] = sums[i][e][0];
          sh.warp_sums[warp][i * S::kPairs + lane * VP + e][1] = sums[i][e][1];
        }
      }
    }
    __syncthreads();
    if (t < S::kChannels) {
      Acc s1 = sh.warp_sums[0][t][0], s2 = sh.warp_sums[0][t][1];
      for (int w = 1; w < kBlockWarps; ++w) {
        s1 += sh.warp_sums[w][t][0];
        s2 += sh.warp_sums[w][t][1];
      }
      sh.block_sums[t][0] = s1;
      sh.block_sums[t][1] = s2;
    }
    cluster.sync();

    if (t < S::kChannels) {
      Acc s1 = Acc(0), s2 = Acc(0);
      for (unsigned r = 0; r < blocks; ++r) {
        const Acc* remote = cluster.map_shared_rank(&sh.block_sums[t][0], r);
        s1 += remote[0];
        s2 += remote[1];
      }
      if (owner) {
        s2 *= rstd_t;
        if (rank == 0) write_partials(p, b, c_t, gate_t.spatial, s1, s2, sh.mean[t]);
        sh.coeff[t] = grad_coefficients(p.gate, gate_t, rstd_t, s1, s2, inv_n);
      }
    }
    cluster.sync();

    // Sweep 2: dx of both halves at this thread's positions, 16-byte stores.
    if (active) {
      T* dx = p.grad_x + base;
      for (int64_t r0 = mine.begin + row; r0 < mine.end; r0 += int64_t(S::kRows) * kUnroll) {
        P v[2][kUnroll], d[2][kUnroll];
        load_split_rows<T, kUnroll>(v, x, r0, mine.end, channels, half_c, j);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t r = r0 + int64_t(u) * S::kRows;
          if (r < mine.end) {
            const P* src = reinterpret_cast<const P*>(dy + r * channels + 2 * j);
            d[0][u] = src[0];
            d[1][u] = src[1];
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t r = r0 + int64_t(u) * S::kRows;
          if (r < mine.end) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              P o;
#pragma unroll
              for (int e = 0; e < VP; ++e) {
                const int k = i * S::kPairs + lane * VP + e;
                const int oc = 2 * e + i;
                const Acc dye = to_acc(d[oc / VP][u].v[oc % VP]);
                const PlaneGate<Acc> gate{sh.alpha[k], sh.beta[k], false, 0};
                const ElementGrad<Acc> g = element_grad(to_acc(v[i][u].v[e]), dye, sh.mean[k], gate);
                o.v[e] = grad_x<T>(dye, g, gate, sh.coeff[k]);
              }
              store16(reinterpret_cast<P*>(dx + r * channels + i * half_c + j), o);
            }
          }
        }
      }
    }
    __syncthreads();  // the next item rewrites the tile's gates, read by this sweep
  }
}

// Launches a split kernel: `requested` blocks per cluster (the variant's; 1: no cluster),
// else (0) enough that the B * tiles clusters fill about twice the multiprocessors, each
// block keeping at least kRows positions of its image; never more than the device and the
// kernel's binary allow (max_cluster_blocks: 1 on sm_80).
template <typename T, typename Params, typename... KernelArgs>
inline cudaError_t launch_split(void (*kernel)(KernelArgs...), const Params& p, int requested,
                                cudaStream_t stream) {
  using S = SplitTiling<T>;
  const int64_t items = p.shape.batch * ceil_div(p.shape.channels / 2, S::kPairs);
  const int64_t hw = p.shape.height * p.shape.width;
  const int most = max_cluster_blocks(kernel);
  int blocks = 1;
  if (requested >= 1) {
    blocks = requested < most ? requested : most;
  } else {
    const int64_t target = 2 * int64_t(device_sms());
    while (blocks * 2 <= most && items * blocks < target && hw >= int64_t(2 * blocks) * S::kRows) {
      blocks *= 2;
    }
  }
  if (blocks == 1) return launch(kernel, items, stream, p);
  return launch_cluster(kernel, items, blocks, stream, p);
}

}  // namespace detail
}  // namespace sa_kernels
