"""End to end: SA-ResNet-50 training steps and inference forwards, per way of running its SA layers.

A *model case* is one (mode, batch, image size, layout, precision); a *model provider* is
what runs the network:

* ``no-sa``: the same ResNet-50 with every SA layer replaced by the identity: the floor, what
  SA may cost at best (nothing);
* ``eager``: the reference ``ShuffleAttention``;
* ``cuda``, ``triton``, ``cpu``, ``torch``: ``FusedShuffleAttention(backend=...)``;
* ``compile``, ``compile-fused``: ``torch.compile`` of the whole model, with the reference
  SA and with the fused SA (the device's fastest backend).

``train`` is one optimiser step: forward, cross-entropy, backward, SGD with momentum.
``inference`` is a forward under ``torch.no_grad`` in eval mode. ``bf16-autocast`` runs
either under ``torch.autocast(dtype=torch.bfloat16)``; parameters stay float32.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from .cases import COMPILE_CHOICES, LAYOUTS
from .workload import compile_backend

MODEL_MODES = ("train", "inference")
PRECISIONS = {"bf16-autocast": torch.bfloat16, "float32": None}
FUSED_MODEL_PROVIDERS = ("cuda", "triton", "cpu", "torch")
MODEL_PROVIDERS = ("no-sa", "eager") + FUSED_MODEL_PROVIDERS + ("compile", "compile-fused")
DEFAULT_MODEL_PROVIDERS = {
    "cuda": ("no-sa", "eager", "cuda", "triton", "compile", "compile-fused"),
    "cpu": ("no-sa", "eager", "cpu", "torch", "compile", "compile-fused"),
}
MODEL_SETS = ("auto", "quick", "full", "cpu", "none")
NUM_CLASSES = 1000


@dataclass(frozen=True)
class ModelCase:
    mode: str
    batch: int
    image: int
    layout: str
    precision: str
    # Whole-model torch.compile (minutes of compilation per case) runs on flagged cases only,
    # and only with --sa-compile all.
    compile: bool = False

    @property
    def id(self):
        return f"sa_resnet50-{self.mode}-b{self.batch}-{self.image}px-{self.layout}-{self.precision}"

    @property
    def label(self):
        return f"sa_resnet50 {self.mode} b{self.batch} {self.image}x{self.image}"

    @property
    def memory_format(self):
        return torch.channels_last if self.layout == "channels_last" else torch.contiguous_format

    @property
    def autocast_dtype(self):
        return PRECISIONS[self.precision]

    @property
    def input_bytes(self):
        return self.batch * 3 * self.image * self.image * 4  # float32 images

    def to_dict(self):
        return {"mode": self.mode, "batch": self.batch, "image": self.image,
                "layout": self.layout, "precision": self.precision, "compile": self.compile}


def model_case_from_dict(data):
    return ModelCase(data["mode"], data["batch"], data["image"], data["layout"],
                     data["precision"], data.get("compile", False))


def _grid(modes_batches, layouts, precisions, image=224, compile_where=()):
    return tuple(ModelCase(mode, batch, image, layout, precision,
                           compile=(mode, batch, layout, precision) in compile_where)
                 for mode, batch in modes_batches for layout in layouts
                 for precision in precisions)


_GPU_MODES = (("train", 64), ("inference", 64), ("inference", 1))
MODEL_CASES = {
    # Batch 64 at 224x224 (and inference at batch 1), both layouts, both precisions; the whole
    # model compiled in channels_last bf16, the configuration a GPU user trains in.
    "full": _grid(_GPU_MODES, ("channels_last", "nchw"), tuple(PRECISIONS),
                  compile_where={(m, b, "channels_last", "bf16-autocast") for m, b in _GPU_MODES}),
    "quick": _grid((("train", 64),), ("channels_last",), ("bf16-autocast",),
                   compile_where={("train", 64, "channels_last", "bf16-autocast")}),
    # On a CPU: inference at batch 1 in float32 (training ResNet-50 is not a CPU workload).
    "cpu": _grid((("inference", 1),), LAYOUTS[::-1], ("float32",),
                 compile_where={("inference", 1, "channels_last", "float32")}),
    "none": (),
}


def resolve_model_set(device_type, model_set="auto", shape_set="auto"):
    """``auto``: on a GPU the full set (the quick one with ``--sa-shapes quick``); on a CPU ``cpu``."""
    if model_set not in MODEL_SETS:
        raise ValueError(f"model set must be one of {MODEL_SETS}, got {model_set!r}")
    if model_set != "auto":
        return model_set
    if device_type != "cuda":
        return "cpu"
    return "quick" if shape_set == "quick" else "full"


def select_model_cases(device_type, model_set="auto", shape_set="auto"):
    return list(MODEL_CASES[resolve_model_set(device_type, model_set, shape_set)])


def parse_model_providers(text, device_type):
    if text in (None, "", "auto"):
        return DEFAULT_MODEL_PROVIDERS["cuda" if device_type == "cuda" else "cpu"]
    chosen = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in chosen if p not in MODEL_PROVIDERS]
    if unknown or not chosen:
        raise ValueError(f"model providers must be among {MODEL_PROVIDERS}, got {text!r}")
    return tuple(p for p in MODEL_PROVIDERS if p in chosen)


def model_providers_for(case, providers, compile_choice="auto"):
    """Providers for ``case`` in run order; whole-model compile only on flagged cases with ``all``."""
    if compile_choice not in COMPILE_CHOICES:
        raise ValueError(f"--sa-compile must be one of {COMPILE_CHOICES}, got {compile_choice!r}")
    compiled = compile_choice == "all" and case.compile
    return [p for p in providers if compiled or not p.startswith("compile")]


def model_parametrization(cases, providers, compile_choice="auto"):
    return [(case, p) for case in cases for p in model_providers_for(case, providers, compile_choice)]


def fused_backend_for(device):
    """The fused SA backend ``compile-fused`` uses: the device's fastest that can run now."""
    device = torch.device(device)
    order = ("cuda", "triton") if device.type == "cuda" else ("cpu", "torch")
    for name in order:
        # build=False: like backend="auto", never compile an extension to answer
        if name in backends.BACKENDS and backends.unavailable_reason(name, device, build=False) is None:
            return name
    return "torch"


def model_skip_reason(provider, device):
    """Why ``provider`` is not benchmarked end to end on ``device`` (``None`` when it is)."""
    device = torch.device(device)
    if provider not in MODEL_PROVIDERS:
        raise ValueError(f"model provider must be one of {MODEL_PROVIDERS}, got {provider!r}")
    if provider in ("no-sa", "eager"):
        return None
    if provider.startswith("compile"):
        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile is not supported on this platform"
        return None
    if provider == "torch" and device.type == "cuda":
        return ("the torch backend is the CPU path and the fallback; on a GPU the model runs "
                "with the cuda and triton backends")
    from .cases import provider_skip_reason
    return provider_skip_reason(provider, device)


def strip_shuffle_attention(model):
    """Replace every bottleneck's SA layer by the identity (in place): ResNet-50 without SA."""
    from ..models import SABottleneck
    for module in model.modules():
        if isinstance(module, SABottleneck):
            module.sa = nn.Identity()
    return model


def build_model(provider, device, layout="channels_last", seed=0, arch=None):
    """The network ``provider`` runs, on ``device`` in ``layout``; same weights for every provider.

    ``arch(fused=..., backend=...)`` builds the network (default ``sa_resnet50``; tests pass a
    smaller ``SAResNet``).
    """
    from ..models import sa_resnet50
    if provider not in MODEL_PROVIDERS:
        raise ValueError(f"model provider must be one of {MODEL_PROVIDERS}, got {provider!r}")
    arch = arch or (lambda **kw: sa_resnet50(num_classes=NUM_CLASSES, **kw))
    device = torch.device(device)
    torch.manual_seed(seed)
    with device:  # built (and initialised) where it runs: far quicker than on the CPU for a GPU
        if provider in ("no-sa", "eager", "compile"):
            model = arch(fused=False)
            if provider == "no-sa":
                strip_shuffle_attention(model)
        else:
            backend = fused_backend_for(device) if provider == "compile-fused" else provider
            model = arch(fused=True, backend=backend)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt)
    if provider.startswith("compile"):
        torch._dynamo.reset()
        model = torch.compile(model, backend=compile_backend())
    return model


def sa_backend_of(provider, device):
    if provider in FUSED_MODEL_PROVIDERS:
        return provider
    if provider == "compile-fused":
        return fused_backend_for(device)
    return None if provider == "no-sa" else "reference"


def model_step(case, provider, device, seed=0, arch=None, num_classes=NUM_CLASSES):
    """One ``case.mode`` step of the network ``provider`` runs, on fixed random data.

    train: zero the gradients, forward and cross-entropy (under autocast for bf16), backward,
    SGD step with momentum and weight decay; returns the loss. inference: eval mode, forward
    under ``torch.no_grad``; returns the logits. The step has ``.model`` attached.
    """
    device = torch.device(device)
    model = build_model(provider, device, case.layout, seed, arch)
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(case.batch, 3, case.image, case.image, device=device, generator=generator)
    x = x.contiguous(memory_format=case.memory_format)
    autocast_dtype = case.autocast_dtype

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    if case.mode == "train":
        model.train()
        y = torch.randint(0, num_classes, (case.batch,), device=device, generator=generator)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            return loss
    elif case.mode == "inference":
        model.eval()

        def step():
            with torch.no_grad(), autocast():
                return model(x)
    else:
        raise ValueError(f"model mode must be one of {MODEL_MODES}, got {case.mode!r}")
    step.model = model
    return step


def model_record(case, provider, wall_s, device, refs, peak_bytes=None, sa_backend=None):
    """A model case's ``extra_info``: the same field names as a kernel row, plus the model's own.

    ``refs`` maps ``no-sa`` and ``eager`` to ``(wall_s, device_s)`` of the same model case,
    measured earlier in the run. Kernel-only fields (% of copy, bytes saved for backward) are
    present and ``None``.
    """
    from .metrics import speedup
    device_us = device.get("device_us")
    device_s = None if device_us is None else device_us * 1e-6
    record = {
        "kind": "model",
        "model": "sa_resnet50",
        "case": case.label,
        "shape": [case.batch, 3, case.image, case.image],
        "batch": case.batch,
        "image": case.image,
        "dtype": "bfloat16" if case.autocast_dtype is torch.bfloat16 else "float32",
        "precision": case.precision,
        "layout": case.layout,
        "mode": case.mode,
        "provider": provider,
        "sa_backend": sa_backend,
        "input_bytes": case.input_bytes,
        "wall_us": wall_s * 1e6,
        "device_us": device_us,
        "launches": device.get("launches"),
        "images_per_s": case.batch / wall_s if wall_s else None,
        "pct_copy_wall": None,
        "pct_copy_device": None,
        "peak_bytes": peak_bytes,
        "saved_bytes": None,
    }
    for clock, index, t in (("wall", 0, wall_s), ("device", 1, device_s)):
        floor = refs.get("no-sa")
        floor_t = None if floor is None else floor[index]
        record[f"sa_cost_us_{clock}"] = (None if floor_t is None or t is None
                                         else (t - floor_t) * 1e6)
        eager = refs.get("eager")
        record[f"speedup_vs_eager_{clock}"] = speedup(None if eager is None else eager[index], t)
    record.update({k: v for k, v in device.items() if k not in record})
    return record
