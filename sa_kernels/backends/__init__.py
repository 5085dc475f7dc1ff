"""Which implementation runs the ``sa_kernels`` ops.

Each backend is a module with the same three functions:

* ``unavailable_reason(device, build) -> str | None``: why it cannot run on
  ``device`` (with the remedy), or ``None`` when it can. ``build=False`` asks
  whether it can run without compiling anything first.
* ``forward(x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps)``
  ``-> (out, mean, rstd)``
* ``backward(grad_out, x, cweight, cbias, sweight, sbias, gn_weight, gn_bias,
  mean, rstd, groups, eps) -> (dx, dcweight, dcbias, dsweight, dsbias, dgn_weight, dgn_bias)``

Parameters arrive 1-D (``half`` values each); ``mean`` and ``rstd`` are the
per-(b, c) plane statistics, shape (B, C), float64 for float64 input and
float32 otherwise. All backends share that format, so a forward from one
backend can be differentiated by another.

A backend module with ``NATIVE = True`` (``cpu``, ``cuda``) runs through the native
ops ``sa_kernels::shuffle_attention`` / ``shuffle_attention_backward``, whose autograd
is in C++: the module and the functional form call them directly, one dispatcher trip
per call. The others go through the Python ops of ``sa_kernels.ops``.
"""
import importlib
import os

import torch

ENV_VAR = "SA_KERNELS_BACKEND"
BACKENDS = ("cuda", "triton", "cpu", "torch")
CHOICES = ("auto",) + BACKENDS

_MODULES = {
    "cuda": "sa_kernels.backends.cuda_ext",
    "triton": "sa_kernels.backends.triton_kernels",
    "cpu": "sa_kernels.backends.cpu_native",
    "torch": "sa_kernels.backends.torch_math",
}

# "auto" tries these in order. The Triton interpreter runs on CPU, but far slower
# than the other backends, so it is only ever used on CPU when asked for by name.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
_AUTO_DEFAULT = ("torch",)

_reason_cache = {}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on the given device; the message says why and how to fix it."""


def check_choice(backend):
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    return backend


def _load(name):
    return importlib.import_module(_MODULES[name])


def unavailable_reason(name, device, build=True):
    """Why backend ``name`` cannot run on ``device`` (``None`` if it can). Cached per device type."""
    device = torch.device(device)
    key = (name, device.type, build)
    if key not in _reason_cache:
        try:
            reason = _load(name).unavailable_reason(device, build=build)
        except ImportError as e:
            reason = f"the {name} backend could not be imported ({e})"
        _reason_cache[key] = reason
        if reason is None:  # built now, so "auto" (which never builds) may use it from here on
            _reason_cache[(name, device.type, False)] = None
    return _reason_cache[key]


def available_backends(device=None):
    """Backends that can run on ``device`` now (default: CUDA if present, else CPU), fastest first.

    Nothing is compiled to answer: ``cuda`` is listed once its extension is built (by
    ``pip install``, or by a first use of ``backend="cuda"``).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return [name for name in BACKENDS if unavailable_reason(name, device, build=False) is None]


def requested(backend):
    """The backend asked for: ``SA_KERNELS_BACKEND`` replaces ``"auto"``; a name given in code wins."""
    check_choice(backend)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            if env not in CHOICES:
                raise ValueError(f"{ENV_VAR} must be one of {CHOICES}, got {env!r}")
            backend = env
    return backend


def resolve_name(backend, device):
    """The name of the backend that runs on ``device`` for the choice ``backend``."""
    name = requested(backend)
    device = torch.device(device)
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, _AUTO_DEFAULT):
            if unavailable_reason(candidate, device, build=False) is None:
                return candidate
        raise BackendUnavailableError(f"no sa_kernels backend can run on {device}")
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device}: {reason}")
    return name


def resolve(backend, device):
    """The backend module that runs on ``device`` for the choice ``backend``."""
    return _load(resolve_name(backend, device))


def is_native(name):
    """Whether backend ``name`` runs through the native ops (autograd in C++)."""
    return getattr(_load(name), "NATIVE", False)
