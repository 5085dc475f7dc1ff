// Planes too large for one block's registers, held by a thread-block cluster (sm_90),
// forward and backward (the "plane cluster" path).
//
// One-block kernels hold at most kBlock * 16 packs (forward) or kBlock * 8 (backward) of a
// plane; larger planes took two sweeps, reading x again after its statistics (3N bytes
// forward). Here a cluster of N blocks owns a plane: block rank r holds packs
// [r * per_block, (r + 1) * per_block) in registers, up to ITEMS a thread. Each block reduces
// its part over the block (fixed order), publishes it in shared memory, and after
// cluster.sync() one thread merges all N parts through distributed shared memory in rank
// order 0..N-1 and leaves the plane's values in its block's shared memory; a second
// cluster.sync() publishes them block-wide and keeps every part until all blocks have read
// it. x (and grad_out) are read once. One launch forward, no atomics, bitwise reproducible
// for a given N.
#pragma once

#include <cstdint>

#include "shuffle_attention.h"
#include "shuffle_attention_cluster.cuh"
#include "shuffle_attention_common.cuh"

namespace sa_kernels {
namespace detail {

// Packs a thread holds in the plane-cluster kernels.
constexpr int kPlaneClusterItems = 4;

// This block's packs [begin, begin + count) of a plane of `packs` packs split over `blocks`.
struct PackRange {
  int begin, count;
};

__device__ __forceinline__ PackRange block_packs(int packs, unsigned blocks, unsigned rank) {
  const int per_block = int((int64_t(packs) + blocks - 1) / blocks);
  const int begin = int(rank) * per_block < packs ? int(rank) * per_block : packs;
  return {begin, (begin + per_block < packs ? begin + per_block : packs) - begin};
}

template <typename Acc>
struct PlaneClusterForwardShared {
  Acc sums[kBlockWarps];
  Welford<Acc> part;   // this block's part of the plane; read by the cluster
  Acc mean, rstd;      // the plane's, left by thread 0
};

template <typename T>
__global__ void __launch_bounds__(kBlock) forward_plane_cluster_kernel(const ForwardParams<T> p) {
  using Acc = acc_t<T>;
  constexpr int V = kVec16<T>;
  constexpr int kItems = kPlaneClusterItems;
  using P = Pack<T, V>;
  auto& sh = block_shared<PlaneClusterForwardShared<Acc>>();
  const ClusterGroup cluster = cluster_group();
  const unsigned blocks = cluster.num_blocks();
  const unsigned rank = cluster.block_rank();

  const int64_t channels = p.shape.channels;
  const int64_t planes = p.shape.batch * channels;
  const int hw = int(p.shape.height * p.shape.width);
  const PackRange mine = block_packs(hw / V, blocks, rank);  // V divides H * W (launcher)
  const int64_t clusters = gridDim.x / blocks;

  for (int64_t plane = blockIdx.x / blocks; plane < planes; plane += clusters) {  // cluster-uniform
    // 32-bit division: B * C <= INT32_MAX here (launcher; planes of more than a block's
    // worth each), and a 64-bit one is a call whose saved registers spilled.
    const int64_t b = int(plane) / int(channels);
    const int64_t c = int(plane) % int(channels);
    const P* x = reinterpret_cast<const P*>(p.x + b * p.x_stride.b + c * p.x_stride.c) + mine.begin;

    P held[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = i * kBlock + int(threadIdx.x);
      if (v < mine.count) held[i] = x[v];
    }
    // This block's part: its mean, then the centred sum of squares from the held values.
    Acc sum[1] = {Acc(0)};
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (i * kBlock + int(threadIdx.x) < mine.count) {
#pragma unroll
        for (int e = 0; e < V; ++e) sum[0] += to_acc(held[i].v[e]);
      }
    }
    block_allreduce(sum, sh.sums);
    const int n = mine.count * V;
    const Acc part_mean = n > 0 ? sum[0] / Acc(n) : Acc(0);
    Acc m2[1] = {Acc(0)};
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (i * kBlock + int(threadIdx.x) < mine.count) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const Acc d = to_acc(held[i].v[e]) - part_mean;
          m2[0] += d * d;
        }
      }
    }
    block_allreduce(m2, sh.sums);
    if (threadIdx.x == 0) sh.part = {part_mean, m2[0], n};
    cluster.sync();  // every block's part written and visible across the cluster

    if (threadIdx.x == 0) {
      Welford<Acc> s = *cluster.map_shared_rank(&sh.part, 0);
      for (unsigned r = 1; r < blocks; ++r) s = welford_merge(s, *cluster.map_shared_rank(&sh.part, r));
      sh.mean = s.mean;
      sh.rstd = inv_sqrt(s.m2 / Acc(hw) + Acc(p.eps));
      if (rank == 0) {
        p.mean[plane] = sh.mean;
        p.rstd[plane] = sh.rstd;
      }
    }
    cluster.sync();  // the plane's values visible block-wide; every part has been read

    const Acc mean = sh.mean;
    const PlaneGate<Acc> gate = plane_gate(p.gate, c, mean, sh.rstd);
    P* out = reinterpret_cast<P*>(p.out + b * p.out_stride.b +
                                  output_channel(c, channels) * p.out_stride.c) + mine.begin;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = i * kBlock + int(threadIdx.x);
      if (v < mine.count) {
        P r;
#pragma unroll
        for (int e = 0; e < V; ++e) r.v[e] = gated<T>(to_acc(held[i].v[e]), mean, gate);
        out[v] = r;
      }
    }
    // No barrier before the next plane: it writes sh.sums and sh.part after its own block
    // barriers, sh.mean and sh.rstd after its first cluster.sync(), which every thread
    // reaches only after reading them here.
  }
}

template <typename Acc>
struct PlaneClusterBackwardShared {
  Acc sums[kBlockWarps * 2];
  Acc part[2];   // this block's sum(dt), sum(dt * (x - mean)); read by the cluster
  Acc total[2];  // the plane's, left by thread 0
};

template <typename T>
__global__ void __launch_bounds__(kBlock) backward_plane_cluster_kernel(const BackwardParams<T> p) {
  using Acc = acc_t<T>;
  constexpr int V = kVec16<T>;
  constexpr int kItems = kPlaneClusterItems;
  using P = Pack<T, V>;
  auto& sh = block_shared<PlaneClusterBackwardShared<Acc>>();
  const ClusterGroup cluster = cluster_group();
  const unsigned blocks = cluster.num_blocks();
  const unsigned rank = cluster.block_rank();

  const int64_t channels = p.shape.channels;
  const int64_t planes = p.shape.batch * channels;
  const int hw = int(p.shape.height * p.shape.width);
  const Acc inv_n = Acc(1) / Acc(hw);
  const PackRange mine = block_packs(hw / V, blocks, rank);
  const int64_t clusters = gridDim.x / blocks;

  for (int64_t plane = blockIdx.x / blocks; plane < planes; plane += clusters) {  // cluster-uniform
    const int64_t b = int(plane) / int(channels);  // 32-bit, as in the forward
    const int64_t c = int(plane) % int(channels);
    const int64_t o = output_channel(c, channels);
    const P* x = reinterpret_cast<const P*>(p.x + b * p.x_stride.b + c * p.x_stride.c) + mine.begin;
    const P* dy = reinterpret_cast<const P*>(p.grad_out + b * p.grad_out_stride.b +
                                             o * p.grad_out_stride.c) + mine.begin;

    P held_x[kItems], held_dy[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = i * kBlock + int(threadIdx.x);
      if (v < mine.count) {
        held_x[i] = x[v];
        held_dy[i] = dy[v];
      }
    }
    const Acc mean = p.mean[plane];
    const Acc rstd = p.rstd[plane];
    const PlaneGate<Acc> gate = plane_gate(p.gate, c, mean, rstd);
    Acc sums[2] = {Acc(0), Acc(0)};  // sum(dt), sum(dt * (x - mean))
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (i * kBlock + int(threadIdx.x) < mine.count) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const ElementGrad<Acc> g =
              element_grad(to_acc(held_x[i].v[e]), to_acc(held_dy[i].v[e]), mean, gate);
          sums[0] += g.dt;
          sums[1] += g.dt * g.xc;
        }
      }
    }
    block_allreduce(sums, sh.sums);
    if (threadIdx.x == 0) {
      sh.part[0] = sums[0];
      sh.part[1] = sums[1];
    }
    cluster.sync();

    if (threadIdx.x == 0) {
      Acc s1 = Acc(0), s2 = Acc(0);
      for (unsigned r = 0; r < blocks; ++r) {
        const Acc* remote = cluster.map_shared_rank(&sh.part[0], r);
        s1 += remote[0];
        s2 += remote[1];
      }
      s2 *= rstd;
      sh.total[0] = s1;
      sh.total[1] = s2;
      if (rank == 0) write_partials(p, b, c, gate.spatial, s1, s2, mean);
    }
    cluster.sync();

    const GradCoefficients<Acc> k =
        grad_coefficients(p.gate, gate, rstd, sh.total[0], sh.total[1], inv_n);
    P* dx = reinterpret_cast<P*>(p.grad_x + b * p.grad_x_stride.b + c * p.grad_x_stride.c) + mine.begin;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = i * kBlock + int(threadIdx.x);
      if (v < mine.count) {
        P r;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const Acc dye = to_acc(held_dy[i].v[e]);
          const ElementGrad<Acc> g = element_grad(to_acc(held_x[i].v[e]), dye, mean, gate);
          r.v[e] = grad_x<T>(dye, g, gate, k);
        }
        dx[v] = r;
      }
    }
  }
}

// Blocks per cluster for the plane-cluster path, or 0 where it does not run: forced
// (variant planes = 3: about one pack a thread, at least 2 blocks), else for planes the
// one-block kernels cannot hold (more than `held_packs` packs), as many blocks as hold the
// plane at kPlaneClusterItems packs a thread. 0 if that exceeds what the device and the
// kernel's binary allow (max_cluster_blocks), or B * C exceeds INT32_MAX (the kernels
// divide plane indices in 32 bits).
inline int plane_cluster_blocks(int64_t planes, int64_t packs, int64_t held_packs,
                                const Variant& variant, int most) {
  const int64_t per_block = int64_t(kBlock) * kPlaneClusterItems;
  if (planes > INT32_MAX) return 0;
  int64_t blocks = 0;
  if (variant.planes == Variant::kPlanesCluster) {
    blocks = variant.cluster >= 2 ? variant.cluster : ceil_div(packs, kBlock);
    if (blocks < 2) blocks = 2;
    if (blocks > most) blocks = most;
    if (ceil_div(packs, blocks) > per_block) blocks = 0;
  } else if (variant.planes == Variant::kPlanesAuto && packs > held_packs) {
    blocks = ceil_div(packs, per_block);
    if (blocks > most) blocks = 0;
  }
  return blocks >= 2 ? int(blocks) : 0;
}

}  // namespace detail
}  // namespace sa_kernels
