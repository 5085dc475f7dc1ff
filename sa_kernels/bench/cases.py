"""What the benchmarks measure: shapes, dtypes, modes and providers, and which of them run where.

A *case* is one (shape, dtype, mode); a *provider* is one way to compute it.
Within a case the baselines (``eager``, ``compile``) come first, so the fused
providers measured after them can report their speedups at once.
"""
import os
from dataclasses import dataclass

import torch

from .. import backends

MODES = ("forward", "forward+backward")
DTYPES = (torch.float32, torch.bfloat16)
BASELINES = ("eager", "compile")
FUSED_PROVIDERS = backends.BACKENDS  # ("cuda", "triton", "torch"), FusedShuffleAttention(backend=...)
PROVIDERS = BASELINES + FUSED_PROVIDERS
SHAPE_SETS = ("auto", "quick", "full")


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    channels: int
    height: int
    width: int
    groups: int

    @property
    def dims(self):
        return (self.batch, self.channels, self.height, self.width)

    @property
    def label(self):
        b, c, h, w = self.dims
        return f"{self.name} {b}x{c}x{h}x{w} G{self.groups}"


FULL_SHAPES = (
    Shape("seed", 64, 256, 8, 8, 8),
    # SA-ResNet-50's four stages at batch 64, G=64 (the paper's configuration).
    Shape("resnet50-s1", 64, 256, 56, 56, 64),
    Shape("resnet50-s2", 64, 512, 28, 28, 64),
    Shape("resnet50-s3", 64, 1024, 14, 14, 64),
    Shape("resnet50-s4", 64, 2048, 7, 7, 64),
    Shape("yolo-neck", 16, 256, 80, 80, 8),
    Shape("large-plane", 8, 64, 256, 256, 8),
)

# Without a GPU: the seed and SA-ResNet-50's first stage at batch 2, so the CPU providers
# finish in a minute or two on a small machine (torch.compile's first compile dominates).
QUICK_SHAPES = (
    FULL_SHAPES[0],
    Shape("resnet50-s1-b2", 2, 256, 56, 56, 64),
)


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Case:
    shape: Shape
    dtype: torch.dtype
    mode: str

    @property
    def id(self):
        return f"{self.shape.name}-{dtype_name(self.dtype)}-{self.mode}"

    @property
    def input_bytes(self):
        b, c, h, w = self.shape.dims
        return b * c * h * w * torch.empty((), dtype=self.dtype).element_size()


def shapes_for(device_type, shape_set="auto"):
    """``auto``: every shape on a GPU, the quick set elsewhere."""
    if shape_set not in SHAPE_SETS:
        raise ValueError(f"shape set must be one of {SHAPE_SETS}, got {shape_set!r}")
    if shape_set == "auto":
        shape_set = "full" if device_type == "cuda" else "quick"
    return FULL_SHAPES if shape_set == "full" else QUICK_SHAPES


def select_cases(device_type, shape_set="auto"):
    return [Case(shape, dtype, mode)
            for shape in shapes_for(device_type, shape_set)
            for dtype in DTYPES
            for mode in MODES]


def parametrization(cases):
    """(case, provider) pairs in run order: each case's baselines before its fused providers."""
    return [(case, provider) for case in cases for provider in PROVIDERS]


def provider_skip_reason(provider, device):
    """Why ``provider`` is not benchmarked on ``device`` (``None`` when it is)."""
    device = torch.device(device)
    if provider == "eager":
        return None
    if provider == "compile":
        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile is not supported on this platform"
        return None
    if provider not in FUSED_PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    reason = backends.unavailable_reason(provider, device)
    if reason is not None:
        return reason
    if provider == "triton":
        if device.type != "cuda":
            return ("Triton runs on CPU only in its interpreter, a correctness tool that is not "
                    "a benchmark provider")
        if os.environ.get("TRITON_INTERPRET") == "1":
            return ("TRITON_INTERPRET=1 is set, so Triton would run in its interpreter, which is "
                    "not a benchmark provider; unset it to benchmark the Triton kernels")
    return None
