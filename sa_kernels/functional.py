"""``shuffle_attention``: the functional form of the fused module, and the call both share.

A call goes to one op: the native op ``sa_kernels::shuffle_attention`` (autograd in C++)
when the backend in use is native (``cpu``, ``cuda``), else the Python op
``sa_kernels::forward`` carrying the backend's name. Arguments are checked once, by
the op (in C++ for the native op). Eager calls with plain tensors reach the native op
through ``sa_kernels._C.shuffle_attention``, a binding as lean as torch's own; compiled
graphs and tensor subclasses through ``torch.ops``.
"""
import os

import torch

from . import _native
from . import backends, ops  # noqa: F401  (ops registers torch.ops.sa_kernels.forward)
from ._checks import check_groups, check_inputs
from .decomposition import forward_decomposed

NATIVE = "native"
_fast_native = _native.fast_forward()  # None where the extension is not built
_routes = {}


# A compiled graph resolves the backend once, at trace time, instead of tracing the lookup.
@torch.compiler.assume_constant_result
def route(backend, device):
    """What runs on ``device`` for the choice ``backend``: ``NATIVE`` or a Python backend's name."""
    name = backends.resolve_name(backend, device)
    return NATIVE if backends.is_native(name) else name


def run(route_, x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps):
    """The output of one call along ``route_`` (see ``route``), through ``torch.ops``."""
    if torch._C._are_functorch_transforms_active():  # see run_eager; inside compiled graphs too
        return _in_standard_operators(x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps)
    if route_ is NATIVE:
        return torch.ops.sa_kernels.shuffle_attention.default(
            x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps)[0]
    flat = (p.reshape(-1) for p in (cweight, cbias, sweight, sbias, gn_weight, gn_bias))
    return torch.ops.sa_kernels.forward.default(x, *flat, groups, eps, route_)[0]


def run_eager(route_, x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps):
    """``run`` outside compiled graphs: plain tensors take the lean native binding, or the
    Python backends without the custom-op dispatch (``ops.EagerForward``)."""
    if torch._C._are_functorch_transforms_active():
        return _in_standard_operators(x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps)
    if type(x) is torch.Tensor:
        if route_ is NATIVE:
            return _fast_native(x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps)
        # torch.jit.trace records the op as one node; it would record EagerForward's ops one by
        # one, out= ops among them, and the traced module could not be trained.
        if not torch.jit.is_tracing():
            params = (cweight, cbias, sweight, sbias, gn_weight, gn_bias)
            try:
                flat = tuple(p.reshape(-1) for p in params)
            except AttributeError:  # not a tensor: the same TypeError as the other backends give
                check_inputs(x, params, groups)
                raise
            return ops.EagerForward.apply(x, *flat, groups, eps, route_)
    return run(route_, x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps)


def _in_standard_operators(x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps):
    """The output in standard operators, for torch.func transforms (jvp, jacfwd, grad, vmap):
    they see through those only. The ops' autograd has no forward-mode rule, and a Python
    custom op under jvp gives zero tangents without a word."""
    params = (cweight, cbias, sweight, sbias, gn_weight, gn_bias)
    check_inputs(x, params, groups)
    return forward_decomposed(x, *(p.reshape(-1) for p in params), groups, eps)[0]


def check_tensor(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")


def shuffle_attention(x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps=1e-5,
                      backend="auto"):
    """Shuffle Attention of ``x`` (B, C, H, W) with ``groups`` groups; C = 2 * groups * half.

    The six parameters hold ``half`` values each, in any shape ((1, half, 1, 1)
    as in the module, or (half,)). The output has x's dtype and memory format.
    ``backend`` is ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"torch"``.
    """
    check_tensor(x)
    check_groups(groups)
    params = (cweight, cbias, sweight, sbias, gn_weight, gn_bias)
    if torch.onnx.is_in_onnx_export():
        # ONNX has no sa_kernels op: export the same function in standard operators.
        backends.check_choice(backend)
        return forward_decomposed(x, *(p.reshape(-1) for p in params), groups, float(eps))[0]
    if torch.compiler.is_compiling():
        return run(route(backend, x.device), x, *params, groups, float(eps))
    key = (backend, x.device, os.environ.get(backends.ENV_VAR))
    route_ = _routes.get(key)
    if route_ is None:
        route_ = _routes[key] = route(backend, x.device)
    return run_eager(route_, x, *params, groups, float(eps))
