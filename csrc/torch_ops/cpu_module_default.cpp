// The CPU kernels built for the default capability (setup.py sets its compiler flags).
#include "torch_ops/cpu_module.h"

SA_KERNELS_PYTHON_MODULE(_cpu_default, sa_kernels::cpu::kModuleMethods)
