"""The cuda backend's loading decisions and packaging, checked without a GPU.

The loader is exercised against a pretend CUDA torch (monkeypatched), so each branch
runs here: "auto" never builds, a missing nvcc or a failed build gives a reason that
says what to do, a first-use build happens once. The packaging test builds a wheel
from a copy of the sources and checks that the CUDA sources ship inside it.
"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import sa_kernels
from sa_kernels import backends
from sa_kernels.backends import BackendUnavailableError, cuda_ext

ROOT = Path(__file__).resolve().parents[1]


def test_sources_are_found_from_a_checkout():
    assert cuda_ext.csrc_dir() == ROOT / "csrc"


def test_cpu_tensors_are_refused_with_the_remedy():
    reason = cuda_ext.unavailable_reason(torch.device("cpu"))
    assert "CUDA tensors" in reason and "backend='torch'" in reason
    x = torch.randn(2, 8, 4, 4)
    params = [torch.randn(2) for _ in range(6)]
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        sa_kernels.shuffle_attention(x, *params, groups=2, backend="cuda")


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA")
def test_torch_without_cuda_is_named():
    assert "built without CUDA" in cuda_ext.unavailable_reason(torch.device("cuda"))


@pytest.fixture
def cuda_torch(monkeypatch):
    """A torch that reports CUDA and a GPU; the loader's state and the reason cache start empty."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_ext, "_state", {"loaded_from": None, "prebuilt_error": None, "build_error": None})
    monkeypatch.setattr(backends, "_reason_cache", {})


@pytest.fixture
def pretend_cuda(cuda_torch, monkeypatch, tmp_path):
    """Also: nvcc present, no prebuilt extension; first-use builds are recorded, not run."""
    monkeypatch.setattr(cuda_ext, "_import_prebuilt", lambda: False)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").touch()
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    builds = []
    monkeypatch.setattr(cuda_ext, "_build", lambda: builds.append("built"))
    return builds


CUDA = torch.device("cuda")


def test_auto_never_builds(pretend_cuda):
    reason = cuda_ext.unavailable_reason(CUDA, build=False)
    assert "not built" in reason and "backend='cuda'" in reason and "--no-build-isolation" in reason
    assert pretend_cuda == []
    # "auto" on a GPU then falls through to a backend that needs no build.
    assert backends.resolve("auto", CUDA) is not cuda_ext
    assert pretend_cuda == []


def test_named_backend_builds_once(pretend_cuda):
    assert cuda_ext.unavailable_reason(CUDA, build=True) is None
    assert cuda_ext.unavailable_reason(CUDA, build=False) is None  # loaded now
    assert pretend_cuda == ["built"]
    assert cuda_ext.loaded_from() == "jit"


def test_missing_nvcc_is_named(pretend_cuda, monkeypatch):
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    reason = cuda_ext.unavailable_reason(CUDA, build=True)
    assert "nvcc was not found" in reason and "CUDA_HOME" in reason and "13.0" in reason
    assert pretend_cuda == []


def test_failed_build_is_reported_once(pretend_cuda, monkeypatch):
    calls = []

    def failing_build():
        calls.append(1)
        raise RuntimeError("nvcc fatal : Unsupported gpu architecture 'compute_999'")

    monkeypatch.setattr(cuda_ext, "_build", failing_build)
    reason = cuda_ext.unavailable_reason(CUDA, build=True)
    assert "building the CUDA extension failed" in reason and "compute_999" in reason
    assert cuda_ext.build_error() == reason
    assert cuda_ext.unavailable_reason(CUDA, build=True) == reason  # not rebuilt
    assert calls == [1]
    with pytest.raises(BackendUnavailableError, match="compute_999"):
        backends.resolve("cuda", CUDA)


def test_broken_prebuilt_extension_is_named(cuda_torch, monkeypatch):
    def broken_import(name):
        assert name == "sa_kernels._cuda"
        raise ImportError("sa_kernels/_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEa")

    monkeypatch.setattr(cuda_ext.importlib, "import_module", broken_import)
    reason = cuda_ext.unavailable_reason(CUDA, build=False)
    assert "failed to load" in reason and "undefined symbol" in reason


def test_wheel_ships_the_cuda_sources(tmp_path):
    """A non-editable install carries csrc/ as sa_kernels/_csrc, so the first-use build works from it."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "sa_kernels", src / "sa_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "csrc", src / "csrc")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
           "-v", str(src), "-w", str(tmp_path / "wheel")]
    # Compiling is not what this test is about (the suite runs the built extension).
    result = subprocess.run(cmd, capture_output=True, text=True,
                            env={**os.environ, "SA_KERNELS_SKIP_NATIVE_BUILD": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SA_KERNELS_SKIP_NATIVE_BUILD=1: pure Python install" in result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # What the first-use build compiles: the kernels, the binding and the headers it includes.
    csrc = ROOT / "csrc"
    expected = {f"sa_kernels/_csrc/{p.relative_to(csrc)}" for p in [*csrc.glob("*.*"), *csrc.glob("torch_ops/*.h")]}
    assert expected <= names, sorted(expected - names)
    assert "sa_kernels/backends/cuda_ext.py" in names
