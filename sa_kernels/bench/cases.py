"""What the kernel benchmarks measure: shapes, layouts, dtypes, modes and providers, and where each runs.

A *case* is one (shape, dtype, layout, mode); a *provider* is one way to compute it
(or, for ``copy`` and ``groupnorm``, a yardstick of the same size). Within a case
the yardsticks and baselines come first, so the fused providers measured after
them can report their ratios at once.

Providers:

* ``copy``: ``torch.empty_like(x).copy_(x)``, a plain copy of the input into a new
  tensor (forward cases only: it is the floor any one-pass op pays, and the ratio
  every mode is read against);
* ``groupnorm``: ``nn.GroupNorm(G, C)`` (affine) on an input of the same size, with
  the case's G as its group count; a familiar one-pass normalisation layer, for
  the host-cost comparison (issue 10: the tiny case is exactly ``nn.GroupNorm(8, 16)``
  on a (2, 16, 2, 2) input). Only on the shapes flagged ``groupnorm``;
* ``eager``: the reference module; ``compile``: ``torch.compile`` of it;
* ``cuda``, ``triton``, ``cpu``, ``torch``: ``FusedShuffleAttention(backend=...)``.
"""
import os
from dataclasses import dataclass

import torch

from .. import backends

MODES = ("forward", "forward+backward")
DTYPES = (torch.float32, torch.bfloat16)
LAYOUTS = ("nchw", "channels_last")
YARDSTICKS = ("copy", "groupnorm")
BASELINES = ("eager", "compile")
# FusedShuffleAttention(backend=...). Fixed here rather than read from the registry, so a
# backend this build lacks (``cpu`` before the native op lands) is reported as skipped, with why.
FUSED_PROVIDERS = ("cuda", "triton", "cpu", "torch")
PROVIDERS = YARDSTICKS + BASELINES + FUSED_PROVIDERS
# What runs when --sa-providers is not given: the fused paths of the device at hand.
DEFAULT_PROVIDERS = {
    "cuda": YARDSTICKS + BASELINES + ("cuda", "triton"),
    "cpu": YARDSTICKS + BASELINES + ("cpu", "torch"),
}
SHAPE_SETS = ("auto", "quick", "full", "cpu")
COMPILE_CHOICES = ("auto", "all", "none")


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


SEED = Shape("seed", 64, 256, 8, 8, 8)
# Issue 10's host-cost case: nn.GroupNorm(8, 16) on a (2, 16, 2, 2) input is its yardstick.
TINY = Shape("tiny", 2, 16, 2, 2, 8)
STAGES = tuple(Shape(f"resnet50-s{i + 1}", 64, c, hw, hw, 64)  # SA-ResNet-50, G=64 (the paper)
               for i, (c, hw) in enumerate(((256, 56), (512, 28), (1024, 14), (2048, 7))))
NECK = Shape("yolo-neck", 16, 256, 80, 80, 8)
LARGE = Shape("large-plane", 8, 64, 256, 256, 8)


def at_batch(shape, batch):
    return Shape(f"{shape.name}-b{batch}", batch, shape.channels, shape.height, shape.width,
                 shape.groups)


@dataclass(frozen=True)
class CaseGroup:
    """A shape with the dtypes and layouts it runs in; ``groupnorm`` adds that yardstick."""
    shape: Shape
    layouts: tuple = ("nchw",)
    dtypes: tuple = DTYPES
    groupnorm: bool = False


BOTH = LAYOUTS
CL = ("channels_last",)
F32 = (torch.float32,)

SHAPE_GROUPS = {
    # On a GPU: the seed, SA-ResNet-50's four stages at batch 64, a YOLO neck and a large plane
    # in NCHW; channels_last next to NCHW for stage 1, the neck and the large plane; and
    # channels_last with few planes, where the kernels have measured worst (stage 1 at batch 1
    # and 8, the large plane at batch 1).
    "full": (
        CaseGroup(SEED, groupnorm=True),
        CaseGroup(STAGES[0], BOTH), CaseGroup(STAGES[1]), CaseGroup(STAGES[2]),
        CaseGroup(STAGES[3]),
        CaseGroup(NECK, BOTH), CaseGroup(LARGE, BOTH),
        CaseGroup(at_batch(STAGES[0], 1), CL), CaseGroup(at_batch(STAGES[0], 8), CL),
        CaseGroup(at_batch(LARGE, 1), CL),
    ),
    # A minute on a GPU, a smoke test on a CPU: the host-cost case, the seed, and stage 1 at
    # batch 2 in both layouts.
    "quick": (
        CaseGroup(TINY, dtypes=F32, groupnorm=True),
        CaseGroup(SEED, groupnorm=True),
        CaseGroup(at_batch(STAGES[0], 2), BOTH, F32),
    ),
    # Issue 10's CPU targets: the host-cost case, the CPU benchmark shapes (seed, stage 1 at
    # batch 2) and SA-ResNet-50's four stages at batch 8, both dtypes and both layouts.
    "cpu": (
        CaseGroup(TINY, dtypes=F32, groupnorm=True),
        CaseGroup(SEED, BOTH, groupnorm=True),
        CaseGroup(at_batch(STAGES[0], 2), BOTH),
    ) + tuple(CaseGroup(at_batch(stage, 8), BOTH) for stage in STAGES),
}


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def dtype_from_name(name):
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


@dataclass(frozen=True)
class Case:
    shape: Shape
    dtype: torch.dtype
    mode: str
    layout: str = "nchw"
    groupnorm: bool = False

    @property
    def id(self):
        return f"{self.shape.name}-{dtype_name(self.dtype)}-{self.layout}-{self.mode}"

    @property
    def family(self):
        """The case without its mode: forward and forward+backward share inputs and yardsticks."""
        return (self.shape, self.dtype, self.layout)

    @property
    def memory_format(self):
        return torch.channels_last if self.layout == "channels_last" else torch.contiguous_format

    @property
    def input_bytes(self):
        b, c, h, w = self.shape.dims
        return b * c * h * w * torch.empty((), dtype=self.dtype).element_size()

    def to_dict(self):
        """A JSON-able description, read back by ``case_from_dict`` (prewarm workers)."""
        s = self.shape
        return {"shape": [s.name, s.batch, s.channels, s.height, s.width, s.groups],
                "dtype": dtype_name(self.dtype), "mode": self.mode, "layout": self.layout,
                "groupnorm": self.groupnorm}


def case_from_dict(data):
    return Case(Shape(*data["shape"]), dtype_from_name(data["dtype"]), data["mode"],
                data["layout"], data.get("groupnorm", False))


def resolve_shape_set(device_type, shape_set="auto"):
    if shape_set not in SHAPE_SETS:
        raise ValueError(f"shape set must be one of {SHAPE_SETS}, got {shape_set!r}")
    if shape_set == "auto":
        return "full" if device_type == "cuda" else "quick"
    return shape_set


def select_cases(device_type, shape_set="auto"):
    """``auto``: the full set on a GPU, the quick set elsewhere. Shape-major, forward first."""
    groups = SHAPE_GROUPS[resolve_shape_set(device_type, shape_set)]
    return [Case(g.shape, dtype, mode, layout, g.groupnorm)
            for g in groups for layout in g.layouts for dtype in g.dtypes for mode in MODES]


def parse_providers(text, device_type):
    """``--sa-providers``: ``auto`` (the device's default list) or a comma-separated list."""
    if text in (None, "", "auto"):
        return DEFAULT_PROVIDERS["cuda" if device_type == "cuda" else "cpu"]
    chosen = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in chosen if p not in PROVIDERS]
    if unknown or not chosen:
        raise ValueError(f"providers must be among {PROVIDERS}, got {text!r}")
    return tuple(p for p in PROVIDERS if p in chosen)  # run order, whatever the order given


def providers_for(case, providers, compile_choice="auto"):
    """The providers that measure ``case``, in run order (yardsticks, baselines, fused)."""
    if compile_choice not in COMPILE_CHOICES:
        raise ValueError(f"--sa-compile must be one of {COMPILE_CHOICES}, got {compile_choice!r}")
    chosen = []
    for provider in providers:
        if provider == "copy" and case.mode != "forward":
            continue  # one copy per (shape, dtype, layout): forward+backward reads the forward one
        if provider == "groupnorm" and not case.groupnorm:
            continue
        if provider == "compile" and compile_choice == "none":
            continue
        chosen.append(provider)
    return chosen


def parametrization(cases, providers=PROVIDERS, compile_choice="auto"):
    """(case, provider) pairs in run order: each case's yardsticks and baselines first."""
    return [(case, provider) for case in cases
            for provider in providers_for(case, providers, compile_choice)]


def provider_skip_reason(provider, device):
    """Why ``provider`` is not benchmarked on ``device`` (``None`` when it is)."""
    device = torch.device(device)
    if provider in ("eager", "copy", "groupnorm"):
        return None
    if provider == "compile":
        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile is not supported on this platform"
        return None
    if provider not in FUSED_PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if provider not in backends.BACKENDS:
        return (f"this build of sa_kernels has no {provider!r} backend "
                f"(sa_kernels.backends.BACKENDS = {backends.BACKENDS})")
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
