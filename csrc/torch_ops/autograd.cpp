// Autograd of sa_kernels::shuffle_attention in C++, so a training call is one dispatcher
// trip with no Python in between (as torchvision registers its ops' autograd). The forward
// saves x, the parameters and the (B, C) statistics; the backward is its own op.
#include <tuple>

#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "torch_ops/native_ops.h"

namespace sa_kernels {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using native::backward_op;
using native::forward_op;

class ShuffleAttentionFunction : public torch::autograd::Function<ShuffleAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& cweight,
                               const Tensor& cbias, const Tensor& sweight, const Tensor& sbias,
                               const Tensor& gn_weight, const Tensor& gn_bias, int64_t groups,
                               double eps) {
    Tensor out, mean, rstd;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, mean, rstd) =
          forward_op().call(x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps);
    }
    ctx->save_for_backward({x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, mean, rstd});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list s = ctx->get_saved_variables();
    const auto grads = backward_op().call(grad_outputs[0], s[0], s[1], s[2], s[3], s[4], s[5],
                                          s[6], s[7], s[8], ctx->saved_data["groups"].toInt(),
                                          ctx->saved_data["eps"].toDouble());
    const Tensor all[7] = {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads),
                           std::get<3>(grads), std::get<4>(grads), std::get<5>(grads),
                           std::get<6>(grads)};
    variable_list result(9);  // x, the six parameters, groups, eps
    for (size_t i = 0; i < 7; ++i) {
      if (ctx->needs_input_grad(i)) result[i] = all[i];
    }
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor> shuffle_attention_autograd(
    const Tensor& x, const Tensor& cweight, const Tensor& cbias, const Tensor& sweight,
    const Tensor& sbias, const Tensor& gn_weight, const Tensor& gn_bias, int64_t groups,
    double eps) {
  const variable_list r = ShuffleAttentionFunction::apply(x, cweight, cbias, sweight, sbias,
                                                          gn_weight, gn_bias, groups, eps);
  return {r[0], r[1], r[2]};
}

}  // namespace
}  // namespace sa_kernels

TORCH_LIBRARY_IMPL(sa_kernels, Autograd, m) {
  m.impl("shuffle_attention", &sa_kernels::shuffle_attention_autograd);
  // Double backward is not supported: differentiating the backward raises.
  m.impl("shuffle_attention_backward", torch::autograd::autogradNotImplementedFallback());
}
