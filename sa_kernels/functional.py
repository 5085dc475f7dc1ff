"""``shuffle_attention``: the functional form of the fused module."""
import torch

from . import ops  # noqa: F401  (registers torch.ops.sa_kernels.*)
from ._checks import check_inputs
from .backends import check_choice
from .decomposition import forward_decomposed


def shuffle_attention(x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps=1e-5,
                      backend="auto"):
    """Shuffle Attention of ``x`` (B, C, H, W) with ``groups`` groups; C = 2 * groups * half.

    The six parameters hold ``half`` values each, in any shape ((1, half, 1, 1)
    as in the module, or (half,)). The output has x's dtype and memory format.
    ``backend`` is ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"``.
    """
    check_choice(backend)
    params = (cweight, cbias, sweight, sbias, gn_weight, gn_bias)
    check_inputs(x, params, groups)
    params = tuple(p.reshape(-1) for p in params)
    if torch.onnx.is_in_onnx_export():
        # ONNX has no sa_kernels op: export the same function in standard operators.
        return forward_decomposed(x, *params, groups, float(eps))[0]
    out, _, _ = torch.ops.sa_kernels.forward(x, *params, groups, float(eps), backend)
    return out
