// The CPU kernels built for the avx2 capability (setup.py sets its compiler flags).
#include "torch_ops/cpu_module.h"

SA_KERNELS_PYTHON_MODULE(_cpu_avx2, sa_kernels::cpu::kModuleMethods)
