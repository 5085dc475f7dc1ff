"""Build script: the pure-Python package always; the CUDA extension where it can be built.

The extension (``sa_kernels._C``) is compiled when torch with CUDA and nvcc are
present at build time (``pip install --no-build-isolation .``), for the
architectures in ``TORCH_CUDA_ARCH_LIST`` with ``MAX_JOBS`` parallel jobs.
``SA_KERNELS_SKIP_CUDA_BUILD=1`` skips it. Without it the package still
installs; the CUDA backend then compiles itself on first use.
"""
from setuptools import setup

setup()
