// Torch binding of the Shuffle Attention CUDA kernels: the CUDA implementations of the
// native ops sa_kernels::shuffle_attention / shuffle_attention_backward (schemas in
// torch_ops/ops.cpp). Input checks, device guard, current stream, outputs allocated
// through PyTorch's allocator; the kernels themselves (shuffle_attention_*.cu) know
// nothing of torch. Built as the module sa_kernels._cuda, or on first use.
#include <atomic>
#include <cstdint>
#include <limits>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "shuffle_attention.h"
#include "torch_ops/op_checks.h"
#include "torch_ops/python_module.h"

SA_KERNELS_PYTHON_MODULE(_cuda, nullptr)

namespace sa_kernels {
namespace {

// Planes larger than this take the two-sweep path (negative: only when they do not fit).
// A test hook, set through sa_kernels::cuda_set_register_plane_limit.
std::atomic<int64_t> g_register_plane_limit{-1};

int64_t set_register_plane_limit(int64_t limit) { return g_register_plane_limit.exchange(limit); }

// Kernel family forced where several could run (sa_kernels::Variant; 0: the launchers'
// choice). A test and measurement hook, set through sa_kernels::cuda_set_variant.
std::atomic<int64_t> g_variant{0};

int64_t set_variant(int64_t variant) { return g_variant.exchange(variant); }

template <typename T> struct Tag { using type = T; };

// Calls f(Tag<T>{}) with the kernel element type of `dtype`.
template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(Tag<float>{});
    case at::kDouble: return f(Tag<double>{});
    case at::kHalf: return f(Tag<__half>{});  // same 16-bit layout as at::Half
    case at::kBFloat16: return f(Tag<__nv_bfloat16>{});  // same layout as at::BFloat16
    default:
      TORCH_CHECK(false, op, ": x must be float32, float64, float16 or bfloat16, got ", dtype);
  }
}

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

Shape4 shape_of(const at::Tensor& t) { return {t.size(0), t.size(1), t.size(2), t.size(3)}; }

// What only the CUDA kernels need, beyond the shared checks: 32-bit indices within a plane
// and over the channels.
void check_plane_size(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.size(2) * x.size(3) <= std::numeric_limits<int32_t>::max(),
                    "sa_kernels (cuda): planes of more than 2^31 - 1 elements are not supported, got H * W = ",
                    x.size(2) * x.size(3));
  TORCH_CHECK_VALUE(x.size(1) <= std::numeric_limits<int32_t>::max(),
                    "sa_kernels (cuda): more than 2^31 - 1 channels are not supported, got C = ", x.size(1));
}

// The parameters are tiny (`half` values each): converting them to the accumulation type
// here (a no-op when they already have it) keeps the kernels to one parameter type.
// x and grad_out are never converted or copied.
at::Tensor param_as_acc(const at::Tensor& p, at::ScalarType acc) {
  return p.reshape({-1}).to(acc).contiguous();
}

template <typename Acc>
GateParams<Acc> gate_params(const at::Tensor (&acc_params)[6]) {
  return {acc_params[0].const_data_ptr<Acc>(), acc_params[1].const_data_ptr<Acc>(),
          acc_params[2].const_data_ptr<Acc>(), acc_params[3].const_data_ptr<Acc>(),
          acc_params[4].const_data_ptr<Acc>(), acc_params[5].const_data_ptr<Acc>(),
          acc_params[0].numel()};
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shuffle_attention_cuda(
    const at::Tensor& x, const at::Tensor& cweight, const at::Tensor& cbias,
    const at::Tensor& sweight, const at::Tensor& sbias, const at::Tensor& gn_weight,
    const at::Tensor& gn_bias, int64_t groups, double eps) {
  constexpr const char* op = "sa_kernels::shuffle_attention (cuda)";
  const checks::ParamRefs params = {&cweight, &cbias, &sweight, &sbias, &gn_weight, &gn_bias};
  checks::check_inputs(x, params, groups);
  check_plane_size(x);
  const c10::cuda::CUDAGuard guard(x.device());

  const at::ScalarType acc = checks::acc_dtype(x.scalar_type());
  at::Tensor out = at::empty_like(x);  // x's memory format and strides, as the fake kernel
  at::Tensor mean = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc));
  at::Tensor rstd = at::empty_like(mean);
  if (x.numel() == 0) {
    mean.zero_();
    rstd.zero_();
    return {out, mean, rstd};
  }
  const at::Tensor acc_params[6] = {param_as_acc(cweight, acc), param_as_acc(cbias, acc),
                                    param_as_acc(sweight, acc), param_as_acc(sbias, acc),
                                    param_as_acc(gn_weight, acc), param_as_acc(gn_bias, acc)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();

  dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    ForwardParams<T> p;
    p.x = static_cast<const T*>(x.const_data_ptr());
    p.x_stride = strides_of(x);
    p.out = static_cast<T*>(out.data_ptr());
    p.out_stride = strides_of(out);
    p.gate = gate_params<Acc>(acc_params);
    p.mean = mean.data_ptr<Acc>();
    p.rstd = rstd.data_ptr<Acc>();
    p.shape = shape_of(x);
    p.eps = eps;
    p.register_plane_limit = g_register_plane_limit.load();
    p.variant = g_variant.load();
    check_launch(shuffle_attention_forward<T>(p, stream), op);
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
shuffle_attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& cweight,
              const at::Tensor& cbias, const at::Tensor& sweight, const at::Tensor& sbias,
              const at::Tensor& gn_weight, const at::Tensor& gn_bias, const at::Tensor& mean,
              const at::Tensor& rstd, int64_t groups, double eps) {
  (void)eps;  // rstd already holds it
  constexpr const char* op = "sa_kernels::shuffle_attention_backward (cuda)";
  const checks::ParamRefs params = {&cweight, &cbias, &sweight, &sbias, &gn_weight, &gn_bias};
  checks::check_backward_inputs(grad_out, x, params, mean, rstd, groups);
  check_plane_size(x);
  const at::ScalarType acc = checks::acc_dtype(x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());

  at::Tensor grad_x = at::empty_like(x);  // x's memory format and strides, as the fake kernel
  if (x.numel() == 0) {
    return {grad_x, at::zeros_like(cweight), at::zeros_like(cbias), at::zeros_like(sweight),
            at::zeros_like(sbias), at::zeros_like(gn_weight), at::zeros_like(gn_bias)};
  }
  const at::Tensor acc_params[6] = {param_as_acc(cweight, acc), param_as_acc(cbias, acc),
                                    param_as_acc(sweight, acc), param_as_acc(sbias, acc),
                                    param_as_acc(gn_weight, acc), param_as_acc(gn_bias, acc)};
  // (B, C) statistics: tiny; contiguous as the forward returns them, made so otherwise.
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor rstd_c = rstd.contiguous();
  at::Tensor partials = at::empty({x.size(0), x.size(1), 2}, x.options().dtype(acc));
  at::Tensor acc_grads[6];
  for (int i = 0; i < 6; ++i) {
    acc_grads[i] = at::empty({params[i]->numel()}, x.options().dtype(acc));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();

  dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    BackwardParams<T> p;
    // grad_out keeps its own strides (expanded, permuted, ...): the launcher picks a
    // path that reads them as they are.
    p.grad_out = static_cast<const T*>(grad_out.const_data_ptr());
    p.grad_out_stride = strides_of(grad_out);
    p.x = static_cast<const T*>(x.const_data_ptr());
    p.x_stride = strides_of(x);
    p.grad_x = static_cast<T*>(grad_x.data_ptr());
    p.grad_x_stride = strides_of(grad_x);
    p.gate = gate_params<Acc>(acc_params);
    p.mean = mean_c.const_data_ptr<Acc>();
    p.rstd = rstd_c.const_data_ptr<Acc>();
    p.partials = partials.data_ptr<Acc>();
    p.grads = {acc_grads[0].data_ptr<Acc>(), acc_grads[1].data_ptr<Acc>(),
               acc_grads[2].data_ptr<Acc>(), acc_grads[3].data_ptr<Acc>(),
               acc_grads[4].data_ptr<Acc>(), acc_grads[5].data_ptr<Acc>()};
    p.shape = shape_of(x);
    p.register_plane_limit = g_register_plane_limit.load();
    p.variant = g_variant.load();
    check_launch(shuffle_attention_backward<T>(p, stream), op);
  });

  // Each gradient in its parameter's dtype and shape (a no-op conversion unless the
  // parameter is not in the accumulation type, e.g. float16 parameters).
  at::Tensor grads[6];
  for (int i = 0; i < 6; ++i) {
    grads[i] = acc_grads[i].to(params[i]->scalar_type()).view(params[i]->sizes());
  }
  return {grad_x, grads[0], grads[1], grads[2], grads[3], grads[4], grads[5]};
}

}  // namespace
}  // namespace sa_kernels

TORCH_LIBRARY_FRAGMENT(sa_kernels, m) {
  // Test hook: returns the previous limit.
  m.def("cuda_set_register_plane_limit(int limit) -> int", &sa_kernels::set_register_plane_limit);
  m.def("cuda_set_variant(int variant) -> int", &sa_kernels::set_variant);
}

TORCH_LIBRARY_IMPL(sa_kernels, CUDA, m) {
  m.impl("shuffle_attention", &sa_kernels::shuffle_attention_cuda);
  m.impl("shuffle_attention_backward", &sa_kernels::shuffle_attention_backward_cuda);
}
