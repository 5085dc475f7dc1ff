"""The cuda backend: the hand-written CUDA kernels in csrc/, the CUDA implementation of the native ops.

The native ops themselves (schemas, autograd) come from ``sa_kernels._C`` (see
``_native.py``); their CUDA kernels from one of two places, tried in this order:

* ``sa_kernels._cuda``, built by ``pip install --no-build-isolation .`` where torch with
  CUDA and nvcc were present at build time;
* a build on first use with ``torch.utils.cpp_extension.load`` (ninja; cached by torch
  under ``TORCH_EXTENSIONS_DIR``, so only the first use in an environment pays the few
  minutes). Only a request for this backend by name builds (``build=True``): ``"auto"``
  asks with ``build=False`` and falls back to another backend instead of stalling.

The sources ship inside the package as ``sa_kernels/_csrc`` (an installed package) or
sit in ``csrc/`` next to it (a source checkout or editable install).
"""
import importlib
import shutil
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import _native
from .._native import backward, forward  # noqa: F401  (the backend interface)

# Runs through the native ops, which the module and the functional form call directly.
NATIVE = True
JIT_NAME = "sa_kernels_cuda"
_lock = threading.Lock()
_state = {"loaded_from": None, "prebuilt_error": None, "build_error": None}


def csrc_dir():
    """The directory holding the CUDA sources and their torch binding, or None."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if (candidate / "torch_binding.cpp").is_file():
            return candidate
    return None


def loaded_from():
    """``"prebuilt"`` (sa_kernels._cuda), ``"jit"`` (built on first use) or None (not loaded)."""
    return _state["loaded_from"]


def build_error():
    """The message of a failed first-use build in this process, or None."""
    return _state["build_error"]


def unavailable_reason(device, build=True):
    device = torch.device(device)
    if device.type != "cuda":
        return (f"the cuda backend runs on CUDA tensors only, got a tensor on {device}; "
                f"move the model and input to a GPU, or use backend='torch'")
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) was built without CUDA; "
                f"install a CUDA build of torch to use the cuda backend")
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False: no usable NVIDIA GPU or driver was found"
    reason = _native.unavailable_reason_ops()  # the schemas and autograd the kernels plug into
    if reason is not None:
        return reason
    with _lock:
        return _ensure_loaded(build)


def _ensure_loaded(build):
    if _state["loaded_from"] is not None:
        return None
    if _import_prebuilt():
        _finish_loading("prebuilt")
        return None
    prebuilt_note = (f" (sa_kernels._cuda is present but failed to load: {_state['prebuilt_error']})"
                     if _state["prebuilt_error"] else "")
    if not build:
        return ("the CUDA extension is not built" + prebuilt_note + "; it compiles on first use "
                "when backend='cuda' is asked for by name (a few minutes, cached), or build it ahead "
                "with `pip install --no-build-isolation .` where torch with CUDA and nvcc are present")
    if _state["build_error"] is not None:
        return _state["build_error"]
    reason = _build_blocker()
    if reason is not None:
        return reason + prebuilt_note
    try:
        _build()
    except Exception as e:  # noqa: BLE001 -- any failure becomes the reason, with its message
        message = str(e).strip()
        if len(message) > 3000:
            message = "..." + message[-3000:]
        _state["build_error"] = (f"building the CUDA extension failed ({type(e).__name__}): {message}; "
                                 f"fix the toolchain (nvcc matching torch.version.cuda = "
                                 f"{torch.version.cuda}, a host C++ compiler, ninja) and restart Python")
        return _state["build_error"]
    _finish_loading("jit")
    return None


def _import_prebuilt():
    try:
        importlib.import_module("sa_kernels._cuda")
        return True
    except ModuleNotFoundError as e:
        if e.name != "sa_kernels._cuda":
            _state["prebuilt_error"] = f"{type(e).__name__}: {e}"
        return False
    except (ImportError, OSError) as e:  # e.g. built against another torch
        _state["prebuilt_error"] = f"{type(e).__name__}: {e}"
        return False


def _build_blocker():
    """Why a first-use build cannot start here (with the fix), or None."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None or not (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists():
        return (f"the CUDA extension is not built and nvcc was not found to build it; install the "
                f"CUDA toolkit matching torch.version.cuda = {torch.version.cuda} and set CUDA_HOME, "
                f"or install sa-kernels with `pip install --no-build-isolation .` where nvcc is present")
    if shutil.which("ninja") is None and not _ninja_module_available():
        return "the CUDA extension is not built and ninja is missing to build it; `pip install ninja`"
    if csrc_dir() is None:
        return ("the CUDA extension is not built and its sources (sa_kernels/_csrc or csrc/) are "
                "missing; reinstall sa-kernels")
    return None


def _ninja_module_available():
    try:
        importlib.import_module("ninja")
        return True
    except ImportError:
        return False


def _build():
    from torch.utils import cpp_extension

    sources_dir = csrc_dir()
    sources = [str(sources_dir / "torch_binding.cpp")] + sorted(str(p) for p in sources_dir.glob("*.cu"))
    print(f"sa_kernels: compiling the CUDA extension from {sources_dir} (first use only, takes a "
          f"few minutes; cached by torch.utils.cpp_extension)", file=sys.stderr, flush=True)
    cpp_extension.load(
        name=JIT_NAME,
        sources=sources,
        extra_include_paths=[str(sources_dir)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],  # the C++ standard is torch's own choice
        is_python_module=False,  # registers the ops through torch.ops.load_library
        verbose=False,
    )


def _finish_loading(source):
    _state["loaded_from"] = source


@contextmanager
def register_plane_limit(limit):
    """Within the block, planes of more than ``limit`` elements take the two-sweep path.

    A test hook (0 sends every plane there), so the two-sweep kernels can be checked
    on small shapes. Needs the extension loaded (``unavailable_reason`` returned None).
    """
    previous = torch.ops.sa_kernels.cuda_set_register_plane_limit(int(limit))
    try:
        yield
    finally:
        torch.ops.sa_kernels.cuda_set_register_plane_limit(previous)
