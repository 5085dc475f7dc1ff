// The sa_kernels CUDA kernels and launchers (csrc/*.cu), compiled as host C++ on top of
// emulation.h, behind a C interface for ctypes (tests/test_cuda_emulated.py).
// Every launch records the kernel's name, so the tests can check which path ran.
#define SA_KERNELS_EMULATION 1
#include "emulation.h"

#include <cxxabi.h>
#include <dlfcn.h>

#include <algorithm>

#include "shuffle_attention_common.cuh"

namespace emu {

inline std::vector<std::string> g_launched;
// Grid-stride loops cover any grid; a few blocks keep the emulation fast and make
// every block loop over several planes.
inline unsigned g_max_blocks = 3;
// The emulated device: its multiprocessors (the split kernels' automatic cluster size
// fills about twice these) and the largest cluster it runs (each emulated cluster is
// cluster * 256 OS threads).
inline int g_sms = 2;
inline int g_max_cluster = 4;

inline std::string symbol_name(const void* fn) {
  Dl_info info;
  if (dladdr(fn, &info) == 0 || info.dli_sname == nullptr) return "?";
  int status = 0;
  char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string name = status == 0 ? demangled : info.dli_sname;
  std::free(demangled);
  return name;
}

}  // namespace emu

namespace sa_kernels {
namespace detail {

template <typename... KernelArgs, typename... Args>
inline cudaError_t launch(void (*kernel)(KernelArgs...), int64_t blocks, cudaStream_t,
                          const Args&... args) {
  emu::g_launched.push_back(emu::symbol_name(reinterpret_cast<const void*>(kernel)));
  const unsigned grid = std::min(grid_for(blocks), emu::g_max_blocks);
  emu::run_grid(grid, kBlock, [&] { kernel(args...); });
  return cudaSuccess;
}

// Recorded as "name [cluster N]" so the tests can check the cluster size.
template <typename... KernelArgs, typename... Args>
inline cudaError_t launch_cluster(void (*kernel)(KernelArgs...), int64_t clusters, int cluster_blocks,
                                  cudaStream_t, const Args&... args) {
  emu::g_launched.push_back(emu::symbol_name(reinterpret_cast<const void*>(kernel)) +
                            " [cluster " + std::to_string(cluster_blocks) + "]");
  const unsigned count = std::min(unsigned(std::min<int64_t>(clusters, kMaxBlocks)), emu::g_max_blocks);
  emu::run_clusters(count, unsigned(cluster_blocks), kBlock, [&] { kernel(args...); });
  return cudaSuccess;
}

inline int device_sms() { return emu::g_sms; }

template <typename... KernelArgs>
inline int max_cluster_blocks(void (*)(KernelArgs...)) {
  return emu::g_max_cluster;
}

}  // namespace detail
}  // namespace sa_kernels

#include "shuffle_attention_bwd.cu"
#include "shuffle_attention_fwd.cu"

namespace {

using namespace sa_kernels;

Shape4 shape4(const int64_t* s) { return {s[0], s[1], s[2], s[3]}; }
Strides4 strides4(const int64_t* s) { return {s[0], s[1], s[2], s[3]}; }

template <typename Acc>
GateParams<Acc> gate_params(const void* const* params, int64_t half) {
  return {static_cast<const Acc*>(params[0]), static_cast<const Acc*>(params[1]),
          static_cast<const Acc*>(params[2]), static_cast<const Acc*>(params[3]),
          static_cast<const Acc*>(params[4]), static_cast<const Acc*>(params[5]), half};
}

template <typename T>
int forward(const void* x, const int64_t* xs, void* out, const int64_t* os,
            const void* const* params,
            int64_t half, void* mean, void* rstd, const int64_t* shape, double eps, int64_t limit,
            int64_t variant) {
  using Acc = acc_t<T>;
  ForwardParams<T> p;
  p.x = static_cast<const T*>(x);
  p.x_stride = strides4(xs);
  p.out = static_cast<T*>(out);
  p.out_stride = strides4(os);
  p.gate = gate_params<Acc>(params, half);
  p.mean = static_cast<Acc*>(mean);
  p.rstd = static_cast<Acc*>(rstd);
  p.shape = shape4(shape);
  p.eps = eps;
  p.register_plane_limit = limit;
  p.variant = variant;
  return int(shuffle_attention_forward<T>(p, nullptr));
}

template <typename T>
int backward(const void* dy, const int64_t* dys, const void* x, const int64_t* xs, void* dx,
             const int64_t* dxs, const void* const* params, int64_t half, const void* mean,
             const void* rstd, void* partials, void* const* grads, const int64_t* shape,
             int64_t limit, int64_t variant) {
  using Acc = acc_t<T>;
  BackwardParams<T> p;
  p.grad_out = static_cast<const T*>(dy);
  p.grad_out_stride = strides4(dys);
  p.x = static_cast<const T*>(x);
  p.x_stride = strides4(xs);
  p.grad_x = static_cast<T*>(dx);
  p.grad_x_stride = strides4(dxs);
  p.gate = gate_params<Acc>(params, half);
  p.mean = static_cast<const Acc*>(mean);
  p.rstd = static_cast<const Acc*>(rstd);
  p.partials = static_cast<Acc*>(partials);
  p.grads = {static_cast<Acc*>(grads[0]), static_cast<Acc*>(grads[1]), static_cast<Acc*>(grads[2]),
             static_cast<Acc*>(grads[3]), static_cast<Acc*>(grads[4]), static_cast<Acc*>(grads[5])};
  p.shape = shape4(shape);
  p.register_plane_limit = limit;
  p.variant = variant;
  return int(shuffle_attention_backward<T>(p, nullptr));
}

// dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16.
template <typename F>
int dispatch(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(double{});
    case 2: return f(__half{});
    case 3: return f(__nv_bfloat16{});
    default: return -1;
  }
}

}  // namespace

extern "C" {

int sa_emu_forward(int dtype, const void* x, const int64_t* xs, void* out, const int64_t* os,
                   const void* const* params, int64_t half, void* mean, void* rstd,
                   const int64_t* shape, double eps, int64_t limit, int64_t variant,
                   unsigned max_blocks) {
  emu::g_max_blocks = max_blocks;
  return dispatch(dtype, [&](auto tag) {
    return forward<decltype(tag)>(x, xs, out, os, params, half, mean, rstd, shape, eps, limit,
                                  variant);
  });
}

int sa_emu_backward(int dtype, const void* dy, const int64_t* dys, const void* x, const int64_t* xs,
                    void* dx, const int64_t* dxs, const void* const* params, int64_t half,
                    const void* mean, const void* rstd, void* partials, void* const* grads,
                    const int64_t* shape, int64_t limit, int64_t variant, unsigned max_blocks) {
  emu::g_max_blocks = max_blocks;
  return dispatch(dtype, [&](auto tag) {
    return backward<decltype(tag)>(dy, dys, x, xs, dx, dxs, params, half, mean, rstd, partials,
                                   grads, shape, limit, variant);
  });
}

// The emulated device's multiprocessors and largest cluster (what device_sms and
// max_cluster_blocks report to the launchers).
void sa_emu_set_device(int sms, int max_cluster) {
  emu::g_sms = sms;
  emu::g_max_cluster = max_cluster;
}

// The kernels launched since the last call, one name a line; returns the length needed.
int sa_emu_take_launched(char* buf, int size) {
  std::string all;
  for (const auto& name : emu::g_launched) all += name + "\n";
  emu::g_launched.clear();
  if (buf != nullptr && size > 0) {
    const int n = std::min<int>(size - 1, int(all.size()));
    std::memcpy(buf, all.data(), size_t(n));
    buf[n] = '\0';
  }
  return int(all.size()) + 1;
}

}  // extern "C"
