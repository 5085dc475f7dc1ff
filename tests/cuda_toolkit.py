"""Locating the CUDA toolkit for the tests that compile the CUDA sources without a GPU."""
import os
import shutil
from pathlib import Path


def find_nvcc():
    """Path of nvcc, or None."""
    return shutil.which("nvcc")


def cuda_include_dir():
    """The toolkit's include directory (cuda_runtime.h, cuda_fp16.h), or None.

    nvcc on PATH may be a wrapper script, so its location alone is not enough.
    """
    candidates = [Path(os.environ[var]) / "include" for var in ("CUDA_HOME", "CUDA_PATH")
                  if os.environ.get(var)]
    nvcc = find_nvcc()
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for candidate in candidates:
        if (candidate / "cuda_runtime.h").exists() and (candidate / "cuda_fp16.h").exists():
            return str(candidate)
    return None
