// Argument checks of the native ops, shared by their CPU and CUDA implementations.
//
// The messages and exception types are those of sa_kernels/_checks.py (which checks the
// same things for the fake kernels and the Python ops): ValueError for shapes, sizes and
// devices, TypeError for dtypes, each naming the expected and the actual value.
#pragma once

#include <array>
#include <limits>
#include <sstream>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

namespace sa_kernels {
namespace checks {

inline constexpr const char* kParamNames[6] = {"cweight", "cbias",     "sweight",
                                               "sbias",   "gn_weight", "gn_bias"};

using ParamRefs = std::array<const at::Tensor*, 6>;

// A shape as Python prints a tuple: (2, 16, 5, 5), (3,), ().
inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < sizes.size(); ++i) s << (i ? ", " : "") << sizes[i];
  s << (sizes.size() == 1 ? ",)" : ")");
  return s.str();
}

// A dtype as Python prints it: torch.float32.
inline std::string dtype_str(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Statistics, partial sums and parameter arithmetic: float64 for float64 x, else float32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// x (B, C, H, W) and the six per-channel parameters (`half` values each, any shape).
inline void check_inputs(const at::Tensor& x, const ParamRefs& params, int64_t groups) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D (B, C, H, W), got a ", x.dim(),
                    "-D tensor of shape ", shape_str(x.sizes()));
  TORCH_CHECK_TYPE(supported_dtype(x.scalar_type()),
                   "x must have a floating dtype (float16, bfloat16, float32, float64), got ",
                   dtype_str(x.scalar_type()));
  TORCH_CHECK_VALUE(groups >= 1, "groups must be a positive int, got ", groups);
  const int64_t half = params[0]->numel();
  // 2 * groups * half only where it fits in int64: a wrapped product could match x's channels.
  const bool fits = half == 0 || groups <= std::numeric_limits<int64_t>::max() / 2 / half;
  const int64_t expected_c = fits ? 2 * groups * half : -1;
  TORCH_CHECK_VALUE(fits && x.size(1) == expected_c, "x has ", x.size(1),
                    " channels, expected 2 * G * half = 2 * ", groups, " * ", half,
                    fits ? " = " : " (more than int64 holds)", fits ? std::to_string(expected_c) : "",
                    " (shape ", shape_str(x.sizes()), ")");
  for (int i = 0; i < 6; ++i) {
    const at::Tensor& p = *params[i];
    TORCH_CHECK_VALUE(p.device() == x.device(), kParamNames[i], " is on ", p.device(),
                      ", expected x's device ", x.device());
    TORCH_CHECK_TYPE(supported_dtype(p.scalar_type()), kParamNames[i],
                     " must have a floating dtype, got ", dtype_str(p.scalar_type()));
    TORCH_CHECK_VALUE(p.numel() == half, kParamNames[i], " has ", p.numel(),
                      " elements (shape ", shape_str(p.sizes()), "), expected half = ", half);
  }
}

// The backward's extra inputs: the upstream gradient and the forward's (B, C) statistics.
inline void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x,
                                  const ParamRefs& params, const at::Tensor& mean,
                                  const at::Tensor& rstd, int64_t groups) {
  check_inputs(x, params, groups);
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "grad_out has shape ",
                    shape_str(grad_out.sizes()), ", expected x's shape ", shape_str(x.sizes()));
  TORCH_CHECK_VALUE(grad_out.device() == x.device(), "grad_out is on ", grad_out.device(),
                    ", expected x's device ", x.device());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), "grad_out has dtype ",
                   dtype_str(grad_out.scalar_type()), ", expected x's dtype ",
                   dtype_str(x.scalar_type()));
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const int64_t stats_shape[2] = {x.size(0), x.size(1)};
  const char* names[2] = {"mean", "rstd"};
  const at::Tensor* stats[2] = {&mean, &rstd};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *stats[i];
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(stats_shape) && t.scalar_type() == acc,
                      names[i], " must be the forward's statistics of shape ",
                      shape_str(stats_shape), " and dtype ", dtype_str(acc), ", got shape ",
                      shape_str(t.sizes()), " and dtype ", dtype_str(t.scalar_type()));
    TORCH_CHECK_VALUE(t.device() == x.device(), names[i], " is on ", t.device(),
                      ", expected x's device ", x.device());
  }
}

}  // namespace checks
}  // namespace sa_kernels
