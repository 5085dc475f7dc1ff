// One CPU-kernel module per CPU capability (cpu_module_default.cpp, _avx2, _avx512):
// each registers the CPU implementations of the native ops. sa_kernels/_native.py
// imports exactly one, the one matching the capability torch runs with. Its Python
// functions say what cache size the kernels go by (cache_size.h) and whether they convert to
// bfloat16 with AVX512_BF16 instructions (cpu_vec.h).
#pragma once

#include <torch/library.h>

#include "torch_ops/cpu_kernels.h"
#include "torch_ops/python_module.h"

TORCH_LIBRARY_IMPL(sa_kernels, CPU, m) {
  m.impl("shuffle_attention", &sa_kernels::cpu::shuffle_attention_cpu);
  m.impl("shuffle_attention_backward", &sa_kernels::cpu::shuffle_attention_backward_cpu);
}

namespace sa_kernels {
namespace cpu {

inline PyObject* last_level_cache_bytes_py(PyObject* /*self*/, PyObject* /*args*/) {
  return PyLong_FromLongLong(last_level_cache_bytes());
}

inline PyObject* bf16_instructions_py(PyObject* /*self*/, PyObject* /*args*/) {
#if defined(CPU_CAPABILITY_AVX512)
  return PyBool_FromLong(kCpuHasAvx512Bf16);
#else
  Py_RETURN_FALSE;
#endif
}

inline PyMethodDef kModuleMethods[] = {
    {"last_level_cache_bytes", last_level_cache_bytes_py, METH_NOARGS,
     "The last-level cache size (bytes) above which the kernels stream their outputs."},
    {"bf16_instructions", bf16_instructions_py, METH_NOARGS,
     "Whether the kernels convert float to bfloat16 with AVX512_BF16 instructions."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace cpu
}  // namespace sa_kernels
