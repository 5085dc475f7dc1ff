"""The cpu backend: the fused C++ CPU kernels of the native extension (csrc/torch_ops/).

One pass over each plane for its statistics and the gated output, vectorised with
at::vec for the CPU capability torch runs with, parallel over planes; autograd in C++.
"""
import torch

from .. import _native
from .._native import backward, forward  # noqa: F401  (the backend interface)

# Runs through the native ops, which the module and the functional form call directly.
NATIVE = True


def unavailable_reason(device, build=True):
    device = torch.device(device)
    if device.type != "cpu":
        return (f"the cpu backend runs on CPU tensors only, got a tensor on {device}; "
                f"use backend='cuda' or 'triton' for GPU tensors")
    return _native.unavailable_reason_cpu()
