"""``sa_kernels::forward`` spelled in standard PyTorch operators, for graphs that leave PyTorch.

An ONNX graph cannot hold the ``sa_kernels`` op, so while ``torch.onnx.export``
runs (either exporter), ``shuffle_attention`` computes the same function with
the operators below: per-plane mean and biased variance, the two gates, and the
channel shuffle as a reshape-transpose-reshape. Each of them has a standard
ONNX translation. For a ``torch.export`` program that already holds the op,
``ep.run_decompositions(sa_kernels.decompositions())`` swaps it for the same
operators.
"""
import torch

from . import _native


def forward_decomposed(x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps,
                       backend="auto"):
    """(out, mean, rstd) as the fused ops return them; ``backend`` (the Python op's) is ignored."""
    B, C, H, W = x.shape
    half = C // (2 * groups)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    # (B, G, 2, half, H, W): [:, :, 0] the channel branch, [:, :, 1] the spatial branch.
    xg = x.to(acc).reshape(B, groups, 2, half, H, W)
    mean = xg.mean((4, 5), keepdim=True)
    centred = xg - mean
    rstd = torch.rsqrt((centred * centred).mean((4, 5), keepdim=True) + eps)

    def per_channel(p):
        return p.to(acc).reshape(half, 1, 1)

    gate_c = torch.sigmoid(per_channel(cweight) * mean[:, :, 0] + per_channel(cbias))
    normed = centred[:, :, 1] * rstd[:, :, 1] * per_channel(gn_weight) + per_channel(gn_bias)
    gate_s = torch.sigmoid(per_channel(sweight) * normed + per_channel(sbias))
    gated = torch.stack((xg[:, :, 0] * gate_c, xg[:, :, 1] * gate_s), dim=2)
    # Channel shuffle: input channel i * C/2 + j becomes output channel 2 * j + i.
    out = gated.reshape(B, 2, C // 2, H, W).transpose(1, 2).reshape(B, C, H, W)
    return out.to(x.dtype), mean.reshape(B, C), rstd.reshape(B, C)


def decompositions():
    """A table for ``ExportedProgram.run_decompositions``: the fused ops to standard operators."""
    table = {torch.ops.sa_kernels.forward.default: forward_decomposed}
    if _native.ops_loaded():
        table[torch.ops.sa_kernels.shuffle_attention.default] = forward_decomposed
    return table
