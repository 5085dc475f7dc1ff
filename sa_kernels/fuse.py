"""``fuse_model``: find Shuffle Attention modules by their structure, check each one computes Shuffle
Attention, and swap it for a ``FusedShuffleAttention`` that takes over its parameters.

Public copies of the module differ in names (``G`` or ``groups``; ``cweight`` or ``weight_c`` or
``channel_weight``; ``gn`` or ``norm``) and some that look alike compute something else (another
shuffle, one branch only, a residual). So a module is a *candidate* when it has four per-channel
gate parameters under a known set of names; it is *fit* when it also has one affine
``GroupNorm(half, half)``, a group count, and no other state; and it is *swapped* only when, on a
small random input, it and its fused replacement agree both with its current parameter values and
with random ones (initial values such as ``sweight = 0`` would hide a spatial branch that skips the
GroupNorm). Every candidate left alone is reported with the reason.
"""
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ._checks import SUPPORTED_DTYPES, check_config
from .backends import check_choice
from .module import FusedShuffleAttention

log = logging.getLogger("sa_kernels")

# (channel weight, channel bias, spatial weight, spatial bias) as public copies of the module name them:
# the seed / External-Attention-pytorch / SA-Net's own sa_layer, then renamed copies.
GATE_NAME_SETS = (
    ("cweight", "cbias", "sweight", "sbias"),
    ("weight_c", "bias_c", "weight_s", "bias_s"),
    ("channel_weight", "channel_bias", "spatial_weight", "spatial_bias"),
    ("c_w", "c_b", "s_w", "s_b"),
)
# Where the group count lives: EA-pytorch's ``G``, SA-Net's ``groups``, ``group_num`` in some copies.
GROUP_COUNT_NAMES = ("G", "groups", "group_num")

FUSED_NAMES = ("cweight", "cbias", "sweight", "sbias", "gn.weight", "gn.bias")

# The probe: batch 2, planes 3x5 (neither 1x1 nor square), values with non-zero mean and non-unit
# scale, from a fixed-seed generator of our own (the user's RNG streams are never drawn from).
PROBE_BATCH, PROBE_H, PROBE_W = 2, 3, 5
PROBE_SEED = 0x5A
# Original and fused output agree when |a - b| <= tol * (1 + |b|). Measured on the reference at
# random and initial parameters (C up to 2048, G up to 64), the worst is 1.3 ulp (float16), 1.0 ulp
# (bfloat16), 3.1 ulp (float32), 2.5 ulp (float64): half types get 8 ulp, the others far more. The
# look-alikes in tests/test_fuse_model.py differ from Shuffle Attention by 2.5 to 6 on this probe.
PROBE_TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 8 * torch.finfo(torch.float16).eps,
    torch.bfloat16: 8 * torch.finfo(torch.bfloat16).eps,
}


class FuseError(RuntimeError):
    """``fuse_model(..., strict=True)`` found nothing to fuse or a candidate it had to leave alone."""

    def __init__(self, report):
        super().__init__(str(report))
        self.report = report


@dataclass
class FuseReport:
    """What ``fuse_model`` did. Names are qualified module names (``""`` is the model itself)."""

    swapped: list = field(default_factory=list)        # (name, original class name)
    already_fused: list = field(default_factory=list)  # names of FusedShuffleAttention modules found
    skipped: list = field(default_factory=list)        # (name, class name, reason)

    @property
    def found_any(self):
        return bool(self.swapped or self.already_fused or self.skipped)

    def swapped_classes(self):
        """``{original class name: how many were swapped}``."""
        return dict(Counter(cls for _, cls in self.swapped))

    def summary(self):
        """One line: the counts, and the classes swapped."""
        if not self.found_any:
            return ("fuse_model found no Shuffle Attention module (looked for four per-channel gate "
                    f"parameters named one of {[list(s) for s in GATE_NAME_SETS]})")
        classes = ", ".join(f"{n} {cls}" for cls, n in self.swapped_classes().items())
        return (f"fuse_model swapped {len(self.swapped)} module(s) for FusedShuffleAttention"
                + (f" ({classes})" if classes else "")
                + f", found {len(self.already_fused)} already fused, left {len(self.skipped)} alone")

    def __str__(self):
        lines = [self.summary() + (":" if self.skipped else "")]
        lines += [f"  {_display(name)} ({cls}): {reason}" for name, cls, reason in self.skipped]
        return "\n".join(lines)


def _display(name):
    return name or "(the model itself)"


@dataclass(frozen=True)
class _Layout:
    """Where a fit candidate keeps what the fused module needs."""

    gate_names: tuple  # its names for (cweight, cbias, sweight, sbias)
    gn_name: str
    groups: int
    channel: int

    @property
    def param_names(self):
        """Its names for FUSED_NAMES, in that order."""
        return self.gate_names + (f"{self.gn_name}.weight", f"{self.gn_name}.bias")


class _NotFit(Exception):
    """A candidate that cannot be swapped; the message is the reason."""


def _gate_names(module):
    """The first known name set whose four names are all tensors on ``module``, else None."""
    for names in GATE_NAME_SETS:
        if all(isinstance(getattr(module, n, None), torch.Tensor) for n in names):
            return names
    return None


def _layout(module, gate_names):
    """The candidate's layout, or ``_NotFit`` with the reason it cannot be swapped."""
    own = dict(module.named_parameters(recurse=False))
    not_own = [n for n in gate_names if not isinstance(own.get(n), nn.Parameter)]
    if not_own:
        raise _NotFit(f"not Parameters registered on the module itself: {', '.join(not_own)}")
    half = own[gate_names[0]].numel()
    sizes = {n: own[n].numel() for n in gate_names}
    if half == 0 or len(set(sizes.values())) != 1:
        raise _NotFit(f"its gate parameters do not hold one equal, non-zero number of values: {sizes}")

    norms = [n for n, child in module.named_children() if isinstance(child, nn.GroupNorm)]
    if len(norms) != 1:
        raise _NotFit(f"expected one GroupNorm submodule, found {len(norms)}"
                      + (f" ({', '.join(norms)})" if norms else ""))
    gn_name = norms[0]
    gn = getattr(module, gn_name)
    if not gn.affine or gn.num_groups != half or gn.num_channels != half:
        raise _NotFit(f"its GroupNorm {gn_name!r} is GroupNorm({gn.num_groups}, {gn.num_channels}, "
                      f"affine={gn.affine}), expected an affine GroupNorm({half}, {half})")

    counts = {n: getattr(module, n) for n in GROUP_COUNT_NAMES if hasattr(module, n)}
    counts = {n: v for n, v in counts.items() if isinstance(v, int) and not isinstance(v, bool)}
    if not counts:
        raise _NotFit(f"it has no integer group count attribute ({' or '.join(GROUP_COUNT_NAMES)})")
    if len(set(counts.values())) != 1:
        raise _NotFit(f"its group count attributes disagree: {counts}")
    groups = next(iter(counts.values()))
    channel = 2 * groups * half
    declared = getattr(module, "channel", None)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared != channel:
        raise _NotFit(f"channel={declared} but its parameters and group count give "
                      f"2 * {groups} * {half} = {channel}")
    try:
        check_config(channel, groups)
    except ValueError as e:
        raise _NotFit(str(e)) from None

    layout = _Layout(gate_names, gn_name, groups, channel)
    # Anything else it holds would be dropped by the swap (and its state_dict keys lost).
    held = set(module.state_dict(keep_vars=True)) | {n for n, _ in module.named_buffers()}
    extra = sorted(held - set(layout.param_names))
    if extra:
        raise _NotFit(f"it holds state the fused module has no place for: {', '.join(extra)}")
    hooked = [n or "itself" for n, m in module.named_modules() if _has_hooks(m)]
    if hooked:
        raise _NotFit(f"forward/backward hooks on {', '.join(hooked)} would not carry over to the fused module")

    params = [module.get_parameter(n) for n in layout.param_names]
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise _NotFit(f"its parameters are on several devices: {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "meta":
        raise _NotFit("its parameters are on the meta device, so it cannot be checked; "
                      "fuse after materialising the model")
    bad = {str(p.dtype) for p in params if p.dtype not in SUPPORTED_DTYPES}
    if bad:
        raise _NotFit(f"its parameters have dtypes the fused op does not support: {sorted(bad)}")
    return layout


def _has_hooks(module):
    return any(getattr(module, attr, None) for attr in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _build_fused(cls, module, layout, share):
    """A ``cls`` (a FusedShuffleAttention; backend "torch" for the probe) holding the candidate's
    parameters: the same Parameter objects (``share``, for swaps) or copies in the reference's shapes."""
    fused = cls(layout.channel, G=layout.groups, backend="torch")
    gn = getattr(module, layout.gn_name)
    fused.gn.eps = gn.eps
    for fused_name, name in zip(FUSED_NAMES, layout.param_names):
        src = module.get_parameter(name)
        if not share:
            target = fused.get_parameter(fused_name)
            src = nn.Parameter(src.detach().clone().reshape(target.shape), requires_grad=src.requires_grad)
        owner, attr = (fused.gn, fused_name[3:]) if fused_name.startswith("gn.") else (fused, fused_name)
        setattr(owner, attr, src)
    return fused.train(module.training)


def _probe_context(device):
    """No autograd, no autocast, and the global RNG state restored (a look-alike may draw from it)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    if device.type == "cpu":
        stack.enter_context(torch.random.fork_rng(devices=[]))
    else:
        backend = getattr(torch, device.type)
        index = device.index if device.index is not None else backend.current_device()
        stack.enter_context(torch.random.fork_rng(devices=[index], device_type=device.type))
    stack.enter_context(torch.autocast(device.type, enabled=False))
    return stack


def _verify(module, fused, layout):
    """None if ``module`` and ``fused`` agree on a random probe, at the current and at random
    parameter values, in training and in eval mode; else the reason. Neither module (its mode
    included) nor any RNG stream is changed."""
    params = [module.get_parameter(n) for n in layout.param_names]
    device, dtype = params[0].device, params[0].dtype
    # Drawn on the CPU (a generator exists for every device there) and moved: bit-identical probes
    # wherever the model lives.
    generator = torch.Generator().manual_seed(PROBE_SEED)

    def draw(shape, scale, shift, like_dtype):
        values = torch.randn(shape, generator=generator, dtype=torch.float64) * scale + shift
        return values.to(device=device, dtype=like_dtype)

    x = draw((PROBE_BATCH, layout.channel, PROBE_H, PROBE_W), 1.7, 0.6, dtype)
    random_values = [draw(p.shape, 0.8, 0.2, p.dtype) for p in params]
    runs = (
        ("its current parameters", lambda: module(x), lambda: fused(x)),
        ("random parameters",
         lambda: torch.func.functional_call(module, dict(zip(layout.param_names, random_values)), (x,)),
         lambda: torch.func.functional_call(fused, dict(zip(FUSED_NAMES, random_values)), (x,))),
    )
    tol = PROBE_TOLERANCE[dtype]
    # Both modes: a look-alike may act differently in training (a dropout child, say) and the
    # swap outlives the mode the model is in now.
    modes = [(m, m.training) for m in (*module.modules(), *fused.modules())]
    try:
        with _probe_context(device):
            for training in (module.training, not module.training):
                module.train(training)
                fused.train(training)
                for label, run_original, run_fused in runs:
                    reason = _compare(x, label + (" in training mode" if training else " in eval mode"),
                                      run_original, run_fused, tol, dtype)
                    if reason is not None:
                        return reason
    finally:
        for m, training in modes:
            m.training = training
    return None


def _compare(x, label, run_original, run_fused, tol, dtype):
    """None if the two runs agree within tol x (1 + |out|), else the reason."""
    try:
        expected = run_original()
    except Exception as e:  # a look-alike may refuse the probe in any way
        return f"it raised {type(e).__name__} on a {tuple(x.shape)} probe: {e}"
    if not isinstance(expected, torch.Tensor) or expected.shape != x.shape:
        what = tuple(expected.shape) if isinstance(expected, torch.Tensor) else type(expected).__name__
        return f"it returned {what} for a {tuple(x.shape)} input, not a tensor of that shape"
    try:
        got = run_fused()
    except Exception as e:
        return f"the fused module raised {type(e).__name__} on the probe: {e}"
    expected, got = expected.to(torch.float64), got.to(torch.float64)
    excess = ((got - expected).abs() - tol * (1 + expected.abs())).max().item()
    if not excess <= 0:  # also catches NaN
        err = (got - expected).abs().max().item()
        return (f"it does not compute Shuffle Attention: with {label} its output differs from "
                f"the fused module's by up to {err:.3g} (tolerance {tol:.3g} x (1 + |out|) for {dtype})")
    return None


def _analyse(module):
    """(layout, None) for a fit candidate, (None, reason) for one left alone, None for a non-candidate."""
    gate_names = _gate_names(module)
    if gate_names is None:
        return None
    try:
        layout = _layout(module, gate_names)
    except _NotFit as e:
        return None, str(e)
    return layout, None


def fused_copy(cls, module, backend):
    """``FusedShuffleAttention.from_module``: a checked copy of one module (see there)."""
    check_choice(backend)
    analysis = None if isinstance(module, FusedShuffleAttention) else _analyse(module)
    if analysis is None:
        raise TypeError(f"expected a ShuffleAttention-like module, got {type(module).__name__}")
    layout, reason = analysis
    if layout is not None:
        fused = _build_fused(cls, module, layout, share=False)
        reason = _verify(module, fused, layout)
    if reason is not None:
        raise ValueError(f"cannot fuse {type(module).__name__}: {reason}")
    fused.backend = backend
    return fused


class _SaveUnderOriginalNames:
    """state_dict post-hook of a swapped module: its keys under the original's names, in its order."""

    def __init__(self, names, gn_name):
        self.names = names  # {fused name: original name}, in the original's key order
        self.gn_name = gn_name

    def __call__(self, module, state_dict, prefix, local_metadata):
        for fused_name, name in self.names.items():
            if prefix + fused_name in state_dict:
                state_dict[prefix + name] = state_dict.pop(prefix + fused_name)
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None and self.gn_name != "gn" and prefix + "gn" in metadata:
            metadata[prefix + self.gn_name] = metadata.pop(prefix + "gn")


class _LoadFromOriginalNames:
    """load_state_dict hooks of a swapped module: reads the original's names (and the fused ones),
    and reports its missing keys under the original's names, the keys its state_dict has."""

    def __init__(self, names):
        self.names = names
        self.prefixes = []  # where the pre-hook saw this module in the load under way

    def __call__(self, module, state_dict, prefix, *unused):
        self.prefixes.append(prefix)
        for fused_name, name in self.names.items():
            if name != fused_name and prefix + name in state_dict:
                state_dict[prefix + fused_name] = state_dict.pop(prefix + name)

    def rename_missing(self, module, incompatible_keys):
        original = {p + f: p + n for p in self.prefixes for f, n in self.names.items()}
        self.prefixes = []
        missing = incompatible_keys.missing_keys
        missing[:] = [original.get(key, key) for key in missing]


def _keep_original_keys(fused, module, layout):
    """Make ``fused``'s state_dict keys those of ``module`` (a copy with renamed parameters or GroupNorm)."""
    original_order = list(module.state_dict(keep_vars=True))
    to_fused = dict(zip(layout.param_names, FUSED_NAMES))
    names = {to_fused[n]: n for n in original_order}
    if list(names.items()) == list(zip(FUSED_NAMES, FUSED_NAMES)):
        return
    fused.register_state_dict_post_hook(_SaveUnderOriginalNames(names, layout.gn_name))
    loader = _LoadFromOriginalNames(names)
    fused.register_load_state_dict_pre_hook(loader)
    fused.register_load_state_dict_post_hook(loader.rename_missing)


class _Planner:
    """Walks the model once, deciding every module, before anything is changed."""

    def __init__(self, backend):
        self.backend = backend
        self.report = FuseReport()
        self.swaps = []         # (parent, attribute, fused), applied after the walk
        self.already = []       # FusedShuffleAttention modules that get ``backend``
        self.decided = {}       # id(module) -> its replacement, for modules reachable twice

    def visit(self, module, name):
        """The module to put in place of ``module`` (itself if it stays)."""
        if id(module) in self.decided:
            return self.decided[id(module)]
        replacement = self._decide(module, name)
        self.decided[id(module)] = replacement
        if replacement is module and not isinstance(module, FusedShuffleAttention):
            # _modules, not named_children(): a module held twice must be replaced at both places.
            for child_name, child in list(module._modules.items()):
                if child is None:
                    continue
                new = self.visit(child, f"{name}.{child_name}" if name else child_name)
                if new is not child:
                    self.swaps.append((module, child_name, new))
        return replacement

    def _decide(self, module, name):
        if isinstance(module, FusedShuffleAttention):
            self.already.append(module)
            self.report.already_fused.append(name)
            return module
        analysis = _analyse(module)
        if analysis is None:
            return module
        layout, reason = analysis
        if layout is not None:
            fused = _build_fused(FusedShuffleAttention, module, layout, share=True)
            reason = _verify(module, fused, layout)
        if reason is not None:
            self.report.skipped.append((name, type(module).__name__, reason))
            return module
        _keep_original_keys(fused, module, layout)
        fused.backend = self.backend
        self.report.swapped.append((name, type(module).__name__))
        return fused


def fuse_model(model, backend="auto", *, strict=False, report=False):
    """Swap, in place, every Shuffle Attention module of ``model`` for a ``FusedShuffleAttention``.

    A module is recognised by its structure, whatever its class: four per-channel gate parameters
    (``cweight, cbias, sweight, sbias`` or a known renaming such as ``weight_c, ...`` or
    ``channel_weight, ...``), one affine ``GroupNorm(half, half)`` (any attribute name), a group
    count (``G``, ``groups`` or ``group_num``) and no other state. This covers the seed /
    External-Attention-pytorch ``ShuffleAttention(channel, reduction, G)``, SA-Net's own
    ``sa_layer(channel, groups)``, and copies with renamed parameters. Each such module is run
    against its fused replacement on a tiny random input (no autograd, on its own device and
    dtype, with its current parameters and with random ones, RNG state untouched) and swapped only
    if they agree; a look-alike that computes something else is left alone.

    The fused modules take over the originals' ``Parameter`` objects (an optimizer built before the
    swap keeps training them) and train/eval mode, and keep the model's ``state_dict`` keys (a
    module with renamed parameters saves and loads under its original names; its
    ``named_parameters`` then use the fused names). ``FusedShuffleAttention`` modules already in the
    model get ``backend``. Wrappers such as ``nn.DataParallel`` and ``DistributedDataParallel`` are
    walked into like any module.

    Never silent: logs (logger ``"sa_kernels"``) one INFO line for the swaps and a WARNING for each
    candidate left alone, with the reason, or when nothing was found. ``strict=True`` raises
    ``FuseError`` (with ``.report``), before changing anything, if a candidate has to be left alone
    or nothing is found.

    Returns the model (the fused module itself when ``model`` is a Shuffle Attention module), or
    ``(model, FuseReport)`` with ``report=True``.
    """
    check_choice(backend)
    planner = _Planner(backend)
    result = planner.visit(model, "")
    summary = planner.report
    if strict and (summary.skipped or not summary.found_any):
        raise FuseError(summary)
    for parent, attribute, fused in planner.swaps:
        setattr(parent, attribute, fused)
    for module in planner.already:
        module.backend = backend
    if summary.swapped:
        log.info("%s", summary.summary())
    for name, cls, reason in summary.skipped:
        log.warning("fuse_model left %s (%s) alone: %s", _display(name), cls, reason)
    if not summary.found_any:
        log.warning("%s", summary.summary())
    return (result, summary) if report else result
