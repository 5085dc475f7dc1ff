// Thread-block clusters (sm_90) as the cluster kernels use them: the group (its rank, size,
// barrier and distributed shared memory), and the block's shared state. On sm_80 (and in a
// PTX build for it) a block is its own cluster; the host emulation supplies its own.
//
// Launching: launch_cluster, max_cluster_blocks (shuffle_attention_common.cuh).
#pragma once

#include "shuffle_attention_common.cuh"

#if !defined(SA_KERNELS_EMULATION)
#include <cooperative_groups.h>
#endif

namespace sa_kernels {
namespace detail {

#if defined(SA_KERNELS_EMULATION)
using ClusterGroup = emu::ClusterGroup;
inline ClusterGroup cluster_group() { return emu::this_cluster(); }
template <typename S> S& block_shared() { return emu::block_shared<S>(); }
#else
// A block that is its own cluster: the kernels' form where clusters do not exist (sm_80).
struct SingleBlockCluster {
  __device__ unsigned block_rank() const { return 0; }
  __device__ unsigned num_blocks() const { return 1; }
  __device__ void sync() const { __syncthreads(); }
  template <typename U> __device__ U* map_shared_rank(U* p, unsigned) const { return p; }
};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
using ClusterGroup = cooperative_groups::cluster_group;
__device__ __forceinline__ ClusterGroup cluster_group() { return cooperative_groups::this_cluster(); }
#else
using ClusterGroup = SingleBlockCluster;
__device__ __forceinline__ ClusterGroup cluster_group() { return {}; }
#endif
// The block's shared state of a cluster kernel (mapped across the cluster by map_shared_rank).
template <typename S>
__device__ __forceinline__ S& block_shared() {
  __shared__ S state;
  return state;
}
#endif

}  // namespace detail
}  // namespace sa_kernels
