// The native ops' schemas, declared once; each device registers its implementation
// (cpu_module_*.cpp for CPU, ../torch_binding.cpp for CUDA) and autograd.cpp their
// autograd. Their fake kernels are in sa_kernels/_native.py.
#include <torch/library.h>

TORCH_LIBRARY(sa_kernels, m) {
  // Where the fake kernels live, so torch can import them when it needs them.
  m.set_python_module("sa_kernels._native");
  // Returns (out, mean, rstd): mean and rstd are the (B, C) plane statistics saved for
  // backward, float64 for float64 x and float32 otherwise.
  m.def(
      "shuffle_attention(Tensor x, Tensor cweight, Tensor cbias, Tensor sweight, Tensor sbias, "
      "Tensor gn_weight, Tensor gn_bias, int groups, float eps) -> (Tensor, Tensor, Tensor)");
  // Returns (dx, dcweight, dcbias, dsweight, dsbias, dgn_weight, dgn_bias).
  m.def(
      "shuffle_attention_backward(Tensor grad_out, Tensor x, Tensor cweight, Tensor cbias, "
      "Tensor sweight, Tensor sbias, Tensor gn_weight, Tensor gn_bias, Tensor mean, Tensor rstd, "
      "int groups, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
