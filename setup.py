"""Build script: the pure-Python package always; the CUDA extension where it can be built.

The extension (``sa_kernels._C``) is compiled when torch with CUDA and nvcc are
present at build time (``pip install --no-build-isolation .``), for the
architectures in ``TORCH_CUDA_ARCH_LIST`` with ``MAX_JOBS`` parallel jobs (ninja;
torch's BuildExtension reads both). ``SA_KERNELS_SKIP_CUDA_BUILD=1`` skips it.
Without it the package still installs; the CUDA backend then compiles itself on
first use. The CUDA/C++ sources in csrc/ ship inside the package as
``sa_kernels/_csrc`` either way, which is what that first-use build compiles.
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
SOURCE_PATTERNS = ["*.h", "*.cuh", "*.cu", "*.cpp"]


def _note(message):
    print(f"sa_kernels setup: {message}")


def cuda_extension():
    """(ext_modules, cmdclass) building sa_kernels._C, or ([], {}) where it cannot be built."""
    if os.environ.get("SA_KERNELS_SKIP_CUDA_BUILD", "").strip() == "1":
        _note("SA_KERNELS_SKIP_CUDA_BUILD=1: not building the CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _note("torch is not importable at build time (build with `pip install --no-build-isolation .`): "
              "not building the CUDA extension; it compiles on first use instead")
        return [], {}
    if torch.version.cuda is None:
        _note(f"torch {torch.__version__} has no CUDA: not building the CUDA extension")
        return [], {}
    if CUDA_HOME is None:
        _note("nvcc not found (set CUDA_HOME): not building the CUDA extension")
        return [], {}
    sources = sorted(f"{CSRC}/{p.name}" for p in (ROOT / CSRC).iterdir() if p.suffix in (".cu", ".cpp"))
    extension = CUDAExtension(
        name="sa_kernels._C",
        sources=sources,
        include_dirs=[str(ROOT / CSRC)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()

setup(
    packages=find_packages(include=["sa_kernels", "sa_kernels.*"]) + ["sa_kernels._csrc"],
    package_dir={"sa_kernels._csrc": CSRC},
    package_data={"sa_kernels._csrc": SOURCE_PATTERNS},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
