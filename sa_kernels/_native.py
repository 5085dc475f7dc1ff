"""The native extension: loading it, and the fake kernels of its ops.

``sa_kernels._C`` declares the ops ``sa_kernels::shuffle_attention`` and
``sa_kernels::shuffle_attention_backward`` and registers their autograd in C++. The
CPU kernels come as one module per CPU capability (``_cpu_default``, ``_cpu_avx2``,
``_cpu_avx512``), built with that capability's instructions like PyTorch's own
kernels; the one for the capability torch runs with (``torch.backends.cpu.
get_cpu_capability()``, which honours ``ATEN_CPU_CAPABILITY``) is loaded, or the best
built one below it. The CUDA kernels (``sa_kernels._cuda``) are loaded by
``backends.cuda_ext``.

Importing this module never fails: what could not be loaded is recorded with the
reason, and the backends report it.
"""
import importlib

import torch

from ._checks import acc_dtype, check_backward_inputs, check_inputs

# Capabilities from best to worst; a machine runs any at or below its own.
_CPU_CAPABILITIES = ("avx512", "avx2", "default")
_state = {"ops": None, "ops_error": None, "cpu": None, "cpu_module": None, "cpu_error": None}


def _import(name):
    """The module, or (None, why it could not be imported)."""
    try:
        return importlib.import_module(name), None
    except ImportError as e:  # not built, or built against another torch
        return None, f"{type(e).__name__}: {e}"


def _cpu_candidates():
    capability = torch.backends.cpu.get_cpu_capability().lower()
    if capability in _CPU_CAPABILITIES:
        return _CPU_CAPABILITIES[_CPU_CAPABILITIES.index(capability):]
    return ("default",)  # another architecture's capability (VSX, SVE, ...)


def _load():
    ops, error = _import("sa_kernels._C")
    if ops is None:
        _state["ops_error"] = error
        return
    _state["ops"] = ops
    _register_fakes()
    errors = []
    for isa in _cpu_candidates():
        module, error = _import(f"sa_kernels._cpu_{isa}")
        if module is not None:
            _state["cpu"] = isa
            _state["cpu_module"] = module
            return
        errors.append(f"_cpu_{isa}: {error}")
    _state["cpu_error"] = "; ".join(errors)


def ops_loaded():
    """Whether the native ops (schemas and autograd) are registered."""
    return _state["ops"] is not None


def cpu_capability():
    """The CPU capability whose kernels are loaded ('avx512', 'avx2', 'default'), or None."""
    return _state["cpu"]


def cpu_cache_bytes():
    """The last-level cache size the CPU kernels go by, or None where they are not loaded.

    Above it (input and output together) they write their outputs with non-temporal
    stores; ``SA_KERNELS_CPU_CACHE_BYTES`` sets it (read once per process).
    """
    module = _state["cpu_module"]
    return None if module is None else module.last_level_cache_bytes()


def cpu_bf16_instructions():
    """Whether the CPU kernels convert float to bfloat16 with AVX512_BF16 instructions.

    They do where torch runs AVX-512 kernels and the CPU has AVX512_BF16, unless
    ``SA_KERNELS_CPU_BF16_INSTRUCTIONS=0`` (read once per process). Both round to nearest
    even and give the same bits except for NaN (another NaN pattern) and results below
    2**-126 in magnitude, which the instruction flushes to zero.
    """
    module = _state["cpu_module"]
    return module is not None and getattr(module, "bf16_instructions", lambda: False)()


def unavailable_reason_ops():
    if ops_loaded():
        return None
    return (f"the native extension sa_kernels._C is not built ({_state['ops_error']}); install "
            f"sa-kernels with `pip install --no-build-isolation .` where torch and a C++ compiler are present")


def unavailable_reason_cpu():
    reason = unavailable_reason_ops()
    if reason is not None:
        return reason
    if _state["cpu"] is None:
        return (f"no CPU kernel module of sa_kernels could be loaded ({_state['cpu_error']}); reinstall "
                f"sa-kernels with `pip install --no-build-isolation .` where a C++ compiler is present")
    return None


def _register_fakes():
    """Shapes, dtypes and strides of the native ops without running them (compile, export, opcheck)."""

    @torch.library.register_fake("sa_kernels::shuffle_attention")
    def _forward_fake(x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps):
        check_inputs(x, (cweight, cbias, sweight, sbias, gn_weight, gn_bias), groups)
        stats = x.new_empty(x.shape[:2], dtype=acc_dtype(x.dtype))
        return torch.empty_like(x), stats, torch.empty_like(stats)

    @torch.library.register_fake("sa_kernels::shuffle_attention_backward")
    def _backward_fake(grad_out, x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, mean, rstd,
                       groups, eps):
        params = (cweight, cbias, sweight, sbias, gn_weight, gn_bias)
        check_backward_inputs(grad_out, x, params, mean, rstd, groups)
        return (torch.empty_like(x),) + tuple(p.new_empty(p.shape) for p in params)



def forward(x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps):
    """The native forward (the backend interface of ``backends``): (out, mean, rstd)."""
    return torch.ops.sa_kernels.shuffle_attention.default(
        x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps)


def backward(grad_out, x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, mean, rstd, groups, eps):
    """The native backward: (dx, dcweight, dcbias, dsweight, dsbias, dgn_weight, dgn_bias)."""
    return torch.ops.sa_kernels.shuffle_attention_backward.default(
        grad_out, x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, mean, rstd, groups, eps)


def fast_forward():
    """``sa_kernels._C.shuffle_attention``: the native forward's output from a lean binding, or None."""
    return getattr(_state["ops"], "shuffle_attention", None)


_load()
