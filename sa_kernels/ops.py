"""The Python ops ``sa_kernels::forward`` / ``backward``: any backend, chosen by name at run time.

The module and the functional form call the native ops (``sa_kernels::shuffle_attention``,
declared and differentiated in C++, see ``_native.py``) directly when the backend in use
is native (``cpu``, ``cuda``). These Python ops carry the backend's name as an argument
and hand the work to it at run time (``backends.resolve``): they are the path of the
``triton`` and ``torch`` backends, and work for every backend, in eager mode and inside
compiled graphs alike (one opaque node per op: no graph break).
"""
from typing import Tuple

import torch
from torch import Tensor

from . import backends
from ._checks import acc_dtype, check_backward_inputs, check_inputs


@torch.library.custom_op("sa_kernels::forward", mutates_args=())
def forward(x: Tensor, cweight: Tensor, cbias: Tensor, sweight: Tensor, sbias: Tensor,
            gn_weight: Tensor, gn_bias: Tensor, groups: int, eps: float,
            backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (out, mean, rstd): the output and the per-(b, c) plane statistics saved for backward."""
    params = (cweight, cbias, sweight, sbias, gn_weight, gn_bias)
    check_inputs(x, params, groups)
    return backends.resolve(backend, x.device).forward(x, *params, groups, eps)


@forward.register_fake
def _forward_fake(x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps, backend):
    check_inputs(x, (cweight, cbias, sweight, sbias, gn_weight, gn_bias), groups)
    stats = x.new_empty(x.shape[:2], dtype=acc_dtype(x.dtype))
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("sa_kernels::backward", mutates_args=())
def backward(grad_out: Tensor, x: Tensor, cweight: Tensor, cbias: Tensor, sweight: Tensor,
             sbias: Tensor, gn_weight: Tensor, gn_bias: Tensor, mean: Tensor, rstd: Tensor,
             groups: int, eps: float, backend: str
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dcweight, dcbias, dsweight, dsbias, dgn_weight, dgn_bias)."""
    params = (cweight, cbias, sweight, sbias, gn_weight, gn_bias)
    check_backward_inputs(grad_out, x, params, mean, rstd, groups)
    return backends.resolve(backend, x.device).backward(
        grad_out, x, *params, mean, rstd, groups, eps)


@backward.register_fake
def _backward_fake(grad_out, x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, mean, rstd,
                   groups, eps, backend):
    params = (cweight, cbias, sweight, sbias, gn_weight, gn_bias)
    check_backward_inputs(grad_out, x, params, mean, rstd, groups)
    return (torch.empty_like(x),) + tuple(torch.empty_like(p) for p in params)


def _setup_context(ctx, inputs, output):
    x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, mean, rstd)
    ctx.groups, ctx.eps, ctx.backend = groups, eps, backend
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    grads = torch.ops.sa_kernels.backward(grad_out, *ctx.saved_tensors, ctx.groups, ctx.eps, ctx.backend)
    grads = tuple(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad))
    return grads + (None, None, None)


forward.register_autograd(_backward, setup_context=_setup_context)


class EagerForward(torch.autograd.Function):
    """An eager call of a Python backend (``triton``, ``torch``) for plain tensors: the ops' forward
    and closed-form backward without the custom-op dispatch around each (a (2, 16, 2, 2) training
    call of the torch backend: 497 to 505 us against 613 to 699 us through the ops, on the CPU of
    the README's benchmarks). Compiled graphs and tensor subclasses keep the ops."""

    @staticmethod
    def forward(ctx, x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps, backend):
        params = (cweight, cbias, sweight, sbias, gn_weight, gn_bias)
        check_inputs(x, params, groups)
        impl = backends.resolve(backend, x.device)
        out, mean, rstd = impl.forward(x, *params, groups, eps)
        ctx.save_for_backward(x, *params, mean, rstd)
        ctx.groups, ctx.eps, ctx.impl, ctx.backend = groups, eps, impl, backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            # create_graph: through the op, whose own backward refuses to be differentiated
            # (directly, the gradients would come out as constants: a gradient penalty's
            # second-order term silently dropped).
            grads = torch.ops.sa_kernels.backward(grad_out, *ctx.saved_tensors, ctx.groups, ctx.eps,
                                                  ctx.backend)
        else:
            grads = ctx.impl.backward(grad_out, *ctx.saved_tensors, ctx.groups, ctx.eps)
        grads = tuple(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad))
        return grads + (None, None, None)
