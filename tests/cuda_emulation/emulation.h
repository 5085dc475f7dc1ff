// Host emulation of the CUDA features the sa_kernels kernels use, so their C++ runs on
// CPU threads where no GPU is present (tests/test_cuda_emulated.py).
//
// Each CUDA thread of a block is an OS thread; blocks run one after another (so
// `__shared__` can be a function-local static). __syncthreads is a barrier over the
// block; warp shuffles exchange through a per-warp buffer between two barriers over
// the warp. Both check that no thread of the block (warp) has exited without reaching
// the barrier, i.e. that barriers and full-mask shuffles are never divergent.
//
// Thread-block clusters (sm_90): run_clusters runs the blocks of one cluster at the same
// time (clusters one after another), each with its own shared memory: a cluster kernel
// takes its shared state from block_shared<S>() (a per-block arena here, a `__shared__`
// variable on the device), cluster.sync() is a barrier over every thread of the cluster,
// and cluster.map_shared_rank(p, r) maps p to the same offset in block r's arena, so
// distributed shared memory reads see what the other blocks wrote.
//
// What this checks: indexing, masks, grid-stride loops, reduction orders, barrier
// placement (shared-memory races show up as wrong or flaky results), path choice.
// What it does not: the GPU memory model, real vector instructions, timing, registers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Shared by the threads of a block; blocks run one at a time.
#define __shared__ static

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::abort();
}

// A barrier over n threads that detects a member exiting without arriving.
class CheckedBarrier {
 public:
  explicit CheckedBarrier(int n) : barrier_(n), passed_(n), exited_(n) {}

  void wait(int me, const char* what) {
    barrier_.arrive_and_wait();
    const long mine = ++passed_[me];
    for (size_t i = 0; i < exited_.size(); ++i) {
      if (exited_[i].load() && passed_[i].load() < mine) fail(what);
    }
  }

  void exit(int me) {
    exited_[me].store(true);
    barrier_.arrive_and_drop();
  }

 private:
  std::barrier<> barrier_;
  std::vector<std::atomic<long>> passed_;
  std::vector<std::atomic<bool>> exited_;
};

constexpr int kWarpSize = 32;

struct Warp {
  Warp() : barrier(kWarpSize) {}
  CheckedBarrier barrier;
  alignas(8) unsigned char slots[kWarpSize][8];
};

// Per-block shared memory of a cluster kernel (block_shared), filled with a pattern so a
// read of what nothing wrote shows up as garbage rather than zeros.
constexpr size_t kArenaBytes = 64 * 1024;

struct alignas(64) Arena {
  unsigned char bytes[kArenaBytes];
};

struct ClusterContext {
  unsigned size;                 // blocks in the cluster
  CheckedBarrier* barrier;       // every thread of the cluster
  std::vector<Arena>* arenas;    // one per block, by rank
};

struct ThreadContext {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  CheckedBarrier* block_barrier;
  Warp* warp;
  ClusterContext* cluster;  // null outside a launch
  unsigned cluster_rank;
};

inline thread_local ThreadContext t_ctx;

inline int lane() { return int(t_ctx.thread_idx.x) % kWarpSize; }

inline void syncthreads() {
  t_ctx.block_barrier->wait(int(t_ctx.thread_idx.x),
                            "__syncthreads not reached by the whole block");
}

// Value of `v` in lane `src_of(lane)`, exchanged through the warp's buffer.
template <typename V, typename Src>
V exchange(unsigned mask, V v, Src src_of) {
  static_assert(sizeof(V) <= 8, "shuffle of at most 8 bytes");
  if (mask != 0xffffffffu) fail("only full-mask shuffles are emulated");
  Warp& w = *t_ctx.warp;
  const int me = lane();
  std::memcpy(w.slots[me], &v, sizeof(V));
  w.barrier.wait(me, "shuffle not reached by the whole warp");
  V r;
  std::memcpy(&r, w.slots[src_of(me)], sizeof(V));
  w.barrier.wait(me, "shuffle not reached by the whole warp");
  return r;
}


// Runs `kernel` over `clusters` clusters of `cluster_size` blocks; the blocks of a cluster
// run at the same time, clusters one after another. blockIdx.x = cluster * size + rank.
// An ordinary launch is clusters of one block (as on the device, where such a block is a
// cluster of its own).
inline void run_clusters(unsigned clusters, unsigned cluster_size, unsigned block,
                         const std::function<void()>& kernel) {
  if (block % kWarpSize != 0) fail("block size must be a multiple of the warp size");
  const unsigned grid = clusters * cluster_size;
  for (unsigned c = 0; c < clusters; ++c) {
    std::vector<Arena> arenas(cluster_size);
    for (auto& a : arenas) std::memset(a.bytes, 0xA5, sizeof(a.bytes));
    CheckedBarrier cluster_barrier{static_cast<int>(cluster_size * block)};
    ClusterContext cluster{cluster_size, &cluster_barrier, &arenas};
    std::vector<std::unique_ptr<CheckedBarrier>> block_barriers;
    std::vector<std::unique_ptr<Warp>> warps;
    for (unsigned r = 0; r < cluster_size; ++r) {
      block_barriers.push_back(std::make_unique<CheckedBarrier>(static_cast<int>(block)));
      for (unsigned w = 0; w < block / kWarpSize; ++w) warps.push_back(std::make_unique<Warp>());
    }
    std::vector<std::thread> threads;
    threads.reserve(size_t(cluster_size) * block);
    for (unsigned r = 0; r < cluster_size; ++r) {
      for (unsigned t = 0; t < block; ++t) {
        threads.emplace_back([&, r, t] {
          t_ctx.thread_idx = dim3(t, 0, 0);
          t_ctx.block_idx = dim3(c * cluster_size + r, 0, 0);
          t_ctx.block_dim = dim3(block, 1, 1);
          t_ctx.grid_dim = dim3(grid, 1, 1);
          t_ctx.block_barrier = block_barriers[r].get();
          t_ctx.warp = warps[(r * block + t) / kWarpSize].get();
          t_ctx.cluster = &cluster;
          t_ctx.cluster_rank = r;
          kernel();
          t_ctx.warp->barrier.exit(int(t % kWarpSize));
          t_ctx.block_barrier->exit(int(t));
          cluster_barrier.exit(int(r * block + t));
          t_ctx.cluster = nullptr;
        });
      }
    }
    for (auto& th : threads) th.join();
  }
}

// Runs `kernel` for every thread of every block; blocks one at a time.
inline void run_grid(unsigned grid, unsigned block, const std::function<void()>& kernel) {
  run_clusters(grid, 1, block, kernel);
}

// The cooperative_groups cluster group, as far as the kernels use it.
struct ClusterGroup {
  unsigned block_rank() const { return t_ctx.cluster ? t_ctx.cluster_rank : 0; }
  unsigned num_blocks() const { return t_ctx.cluster ? t_ctx.cluster->size : 1; }
  void sync() const {
    if (t_ctx.cluster == nullptr) fail("cluster.sync() outside a launch");
    t_ctx.cluster->barrier->wait(int(t_ctx.cluster_rank * t_ctx.block_dim.x + t_ctx.thread_idx.x),
                                 "cluster.sync() not reached by the whole cluster");
  }
  template <typename T>
  T* map_shared_rank(T* p, unsigned rank) const {
    if (t_ctx.cluster == nullptr || rank >= t_ctx.cluster->size) fail("map_shared_rank: bad rank");
    auto& arenas = *t_ctx.cluster->arenas;
    const auto* base = arenas[t_ctx.cluster_rank].bytes;
    const auto offset = reinterpret_cast<const unsigned char*>(p) - base;
    if (offset < 0 || size_t(offset) >= kArenaBytes) fail("map_shared_rank: not block_shared memory");
    return reinterpret_cast<T*>(arenas[rank].bytes + offset);
  }
};

inline ClusterGroup this_cluster() { return {}; }

// The block's shared state of a cluster kernel (one S per kernel).
template <typename S>
S& block_shared() {
  static_assert(sizeof(S) <= kArenaBytes, "block_shared state larger than the emulated arena");
  if (t_ctx.cluster == nullptr) fail("block_shared outside a launch");
  return *reinterpret_cast<S*>((*t_ctx.cluster->arenas)[t_ctx.cluster_rank].bytes);
}

}  // namespace emu

#define threadIdx (::emu::t_ctx.thread_idx)
#define blockIdx (::emu::t_ctx.block_idx)
#define blockDim (::emu::t_ctx.block_dim)
#define gridDim (::emu::t_ctx.grid_dim)

inline void __syncthreads() { emu::syncthreads(); }

template <typename V>
V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = emu::kWarpSize) {
  return emu::exchange(mask, v, [=](int me) {
    const int src = me ^ lane_mask;
    // Outside the caller's segment of `width` lanes: the caller's own value.
    return (src / width == me / width) ? src : me;
  });
}

template <typename V>
V __shfl_down_sync(unsigned mask, V v, unsigned delta, int width = emu::kWarpSize) {
  return emu::exchange(mask, v, [=](int me) {
    return (me % width) + int(delta) < width ? me + int(delta) : me;
  });
}
