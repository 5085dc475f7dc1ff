// The CPU kernels built for the avx512 capability (setup.py sets its compiler flags).
#include "torch_ops/cpu_module.h"

SA_KERNELS_PYTHON_MODULE(_cpu_avx512, sa_kernels::cpu::kModuleMethods)
