// Host emulation of the CUDA features the sa_kernels kernels use, so their C++ runs on
// CPU threads where no GPU is present (tests/test_cuda_emulated.py).
//
// Each CUDA thread of a block is an OS thread; blocks run one after another (so
// `__shared__` can be a function-local static). __syncthreads is a barrier over the
// block; warp shuffles exchange through a per-warp buffer between two barriers over
// the warp. Both check that no thread of the block (warp) has exited without reaching
// the barrier, i.e. that barriers and full-mask shuffles are never divergent.
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

struct ThreadContext {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  CheckedBarrier* block_barrier;
  Warp* warp;
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

// Runs `kernel` for every thread of every block; blocks one at a time.
inline void run_grid(unsigned grid, unsigned block, const std::function<void()>& kernel) {
  if (block % kWarpSize != 0) fail("block size must be a multiple of the warp size");
  for (unsigned b = 0; b < grid; ++b) {
    CheckedBarrier block_barrier{static_cast<int>(block)};
    std::vector<std::unique_ptr<Warp>> warps;
    for (unsigned w = 0; w < block / kWarpSize; ++w) warps.push_back(std::make_unique<Warp>());
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        t_ctx.thread_idx = dim3(t, 0, 0);
        t_ctx.block_idx = dim3(b, 0, 0);
        t_ctx.block_dim = dim3(block, 1, 1);
        t_ctx.grid_dim = dim3(grid, 1, 1);
        t_ctx.block_barrier = &block_barrier;
        t_ctx.warp = warps[t / kWarpSize].get();
        kernel();
        t_ctx.warp->barrier.exit(int(t % kWarpSize));
        block_barrier.exit(int(t));
      });
    }
    for (auto& th : threads) th.join();
  }
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
