// Typed handles of the native ops, for calls from C++ through the dispatcher (autograd,
// the Python fast path): unboxed, so a call costs what a built-in op's does.
#pragma once

#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace sa_kernels {
namespace native {

using at::Tensor;

using ForwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&, int64_t, double);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, double);

inline const c10::TypedOperatorHandle<ForwardSig>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sa_kernels::shuffle_attention", "")
                             .typed<ForwardSig>();
  return op;
}

inline const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sa_kernels::shuffle_attention_backward", "")
                             .typed<BackwardSig>();
  return op;
}

}  // namespace native
}  // namespace sa_kernels
