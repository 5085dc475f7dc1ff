"""Build script: the Python package always; the native extension wherever a compiler is present.

Extension modules, each optional (a build that fails leaves the package working through
the backends it has, and says so in one line):

* ``sa_kernels._C``: the native ops' schemas and their autograd, in C++.
* ``sa_kernels._cpu_default`` (and on x86-64 ``_cpu_avx2``, ``_cpu_avx512``): the fused
  CPU kernels, built once per CPU capability like PyTorch's own kernels; the one matching
  the capability torch runs with is loaded.
* ``sa_kernels._cuda``: the CUDA kernels, where torch has CUDA and ``nvcc`` is found,
  for ``TORCH_CUDA_ARCH_LIST`` with ``MAX_JOBS`` parallel jobs.

Build with ``pip install --no-build-isolation .`` so the extension is compiled against the
torch you run. ``SA_KERNELS_SKIP_CUDA_BUILD=1`` skips the CUDA module (the cuda backend then
compiles it on first use); ``SA_KERNELS_SKIP_NATIVE_BUILD=1`` skips every module (pure Python);
``SA_KERNELS_CPU_CAPABILITIES=avx512`` (a comma-separated list) builds only those CPU modules.
The CUDA sources ship inside the package as ``sa_kernels/_csrc`` for that first-use build.
"""
import os
import platform
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
SOURCE_PATTERNS = ["*.h", "*.cuh", "*.cu", "*.cpp", "torch_ops/*.h"]
CXX_FLAGS = ["-O3", "-Wno-unknown-pragmas"]  # ATen's vector headers carry `#pragma unroll`

# CPU capability -> (compiler flags, macros), as PyTorch builds its own CPU kernels.
CPU_CAPABILITIES = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def _note(message):
    print(f"sa_kernels setup: {message}", flush=True)


def _is_x86_64():
    return platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32"


def native_extensions():
    """(ext_modules, cmdclass) for the native extension, or ([], {}) where it cannot be built."""
    if os.environ.get("SA_KERNELS_SKIP_NATIVE_BUILD", "").strip() == "1":
        _note("SA_KERNELS_SKIP_NATIVE_BUILD=1: pure Python install (torch and triton backends)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _note("torch is not importable at build time (build with `pip install --no-build-isolation .`): "
              "pure Python install, the native CPU and CUDA kernels are not built")
        return [], {}

    include_dirs = [str(ROOT / CSRC)]
    ops_sources = [f"{CSRC}/torch_ops/{name}.cpp" for name in ("ops", "autograd", "python_bindings")]
    extensions = [CppExtension("sa_kernels._C", ops_sources, include_dirs=include_dirs,
                               extra_compile_args={"cxx": CXX_FLAGS})]
    capabilities = list(CPU_CAPABILITIES) if _is_x86_64() else ["default"]
    chosen = os.environ.get("SA_KERNELS_CPU_CAPABILITIES", "").strip()
    if chosen:
        capabilities = [isa for isa in capabilities if isa in {c.strip().lower() for c in chosen.split(",")}]
        _note(f"SA_KERNELS_CPU_CAPABILITIES={chosen}: building the CPU kernels for {capabilities or 'none'}")
    # at::parallel_for is OpenMP code in torch's headers: without -fopenmp it runs on one thread.
    # The OpenMP runtime is the one torch already loaded (libgomp.so.1 in torch/lib, same soname).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    for isa in capabilities:
        macros = [f"-DCPU_CAPABILITY={isa.upper()}", f"-DCPU_CAPABILITY_{isa.upper()}"]
        extensions.append(CppExtension(
            f"sa_kernels._cpu_{isa}", [f"{CSRC}/torch_ops/cpu_module_{isa}.cpp"], include_dirs=include_dirs,
            extra_compile_args={"cxx": CXX_FLAGS + macros + CPU_CAPABILITIES[isa] + openmp},
            extra_link_args=openmp))

    if os.environ.get("SA_KERNELS_SKIP_CUDA_BUILD", "").strip() == "1":
        _note("SA_KERNELS_SKIP_CUDA_BUILD=1: not building the CUDA kernels")
    elif torch.version.cuda is None:
        _note(f"torch {torch.__version__} has no CUDA: building the CPU kernels only")
    elif CUDA_HOME is None:
        _note("nvcc not found (set CUDA_HOME): building the CPU kernels only; the cuda backend "
              "compiles itself on first use")
    else:
        sources = [f"{CSRC}/torch_binding.cpp"] + sorted(f"{CSRC}/{p.name}" for p in (ROOT / CSRC).glob("*.cu"))
        extensions.append(CUDAExtension(
            "sa_kernels._cuda", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "-lineinfo"]}))
    return extensions, {"build_ext": _optional_build(BuildExtension)}


def _optional_build(base):
    """A build_ext that treats every extension as optional: a failure is one line, not an error."""

    class OptionalBuildExtension(base):
        def build_extensions(self):
            compiler = getattr(self.compiler, "compiler_cxx", None) or [os.environ.get("CXX", "c++")]
            if shutil.which(compiler[0]) is None:
                _note(f"no C++ compiler ({compiler[0]}) found: pure Python install; the torch backend runs "
                      f"on CPU (install a compiler and reinstall for the native kernels)")
                self.extensions = []
                return
            self._failed = set()
            # One at a time: torch's ninja builds share one build.ninja in build_temp, so
            # `build_ext -j` would have the modules overwrite each other's build files.
            self.parallel = None
            super().build_extensions()
            # Later steps (copying, the editable wheel) only see what was built.
            self.extensions = [ext for ext in self.extensions if ext.name not in self._failed]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 -- any failure leaves the other backends working
                self._failed.add(ext.name)
                first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
                _note(f"could not build {ext.name} ({type(e).__name__}: {first_line}); "
                      f"the package works without it")

    return OptionalBuildExtension


ext_modules, cmdclass = native_extensions()

setup(
    packages=find_packages(include=["sa_kernels", "sa_kernels.*"]) + ["sa_kernels._csrc"],
    package_dir={"sa_kernels._csrc": CSRC},
    package_data={"sa_kernels._csrc": SOURCE_PATTERNS},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
