// One CPU-kernel module per CPU capability (cpu_module_default.cpp, _avx2, _avx512):
// each registers the CPU implementations of the native ops. sa_kernels/_native.py
// imports exactly one, the one matching the capability torch runs with.
#pragma once

#include <torch/library.h>

#include "torch_ops/cpu_kernels.h"
#include "torch_ops/python_module.h"

TORCH_LIBRARY_IMPL(sa_kernels, CPU, m) {
  m.impl("shuffle_attention", &sa_kernels::cpu::shuffle_attention_cpu);
  m.impl("shuffle_attention_backward", &sa_kernels::cpu::shuffle_attention_backward_cpu);
}
