"""Argument checks of the ops (the Python ops and the native ops' fake kernels).

The native ops check the same things in C++ (csrc/torch_ops/op_checks.h) with the
same messages and exception types. Every check runs on the host from shapes, dtypes
and devices only, so it costs no device synchronisation and also runs on fake tensors
under torch.compile.
"""
import torch

PARAM_NAMES = ("cweight", "cbias", "sweight", "sbias", "gn_weight", "gn_bias")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype):
    """Statistics and partial sums: float64 for float64 input, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_config(channel, G):
    """Construction-time check: C must split into G groups of two equal halves."""
    if isinstance(G, bool) or not isinstance(G, int) or G < 1:
        raise ValueError(f"G must be a positive int, got G={G!r}")
    if isinstance(channel, bool) or not isinstance(channel, int) or channel < 1:
        raise ValueError(f"channel must be a positive int, got channel={channel!r}")
    if channel % (2 * G) != 0:
        raise ValueError(
            f"channel must be divisible by 2*G: got channel={channel}, G={G} "
            f"(channel % {2 * G} = {channel % (2 * G)})")


def check_groups(groups):
    """groups: a positive int, not a bool (torch.ops would take True for 1); a SymInt where a
    compiled graph takes it as a dynamic size."""
    if isinstance(groups, bool) or not isinstance(groups, (int, torch.SymInt)) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")


def check_inputs(x, params, groups):
    """Call-time check of x and the six per-channel parameters (each 1-D or (1, half, 1, 1))."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"x must be 4-D (B, C, H, W), got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"x must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    check_groups(groups)
    if len(params) != len(PARAM_NAMES):
        raise ValueError(f"expected {len(PARAM_NAMES)} parameters {PARAM_NAMES}, got {len(params)}")
    for name, p in zip(PARAM_NAMES, params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
    half = params[0].numel()
    expected_c = 2 * groups * half
    if x.shape[1] != expected_c:
        raise ValueError(
            f"x has {x.shape[1]} channels, expected 2 * G * half = 2 * {groups} * {half} = "
            f"{expected_c} (shape {tuple(x.shape)})")
    for name, p in zip(PARAM_NAMES, params):
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device}, expected x's device {x.device}")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must have a floating dtype, got {p.dtype}")
        if p.numel() != half:
            raise ValueError(
                f"{name} has {p.numel()} elements (shape {tuple(p.shape)}), expected half = {half}")


def check_backward_inputs(grad_out, x, params, mean, rstd, groups):
    """The backward's inputs: those of the forward, the upstream gradient and the (B, C) statistics."""
    check_inputs(x, params, groups)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out has shape {tuple(grad_out.shape)}, expected x's shape {tuple(x.shape)}")
    if grad_out.device != x.device:
        raise ValueError(f"grad_out is on {grad_out.device}, expected x's device {x.device}")
    if grad_out.dtype != x.dtype:
        raise TypeError(f"grad_out has dtype {grad_out.dtype}, expected x's dtype {x.dtype}")
    stats_shape, stats_dtype = tuple(x.shape[:2]), acc_dtype(x.dtype)
    for name, t in (("mean", mean), ("rstd", rstd)):
        if tuple(t.shape) != stats_shape or t.dtype != stats_dtype:
            raise ValueError(
                f"{name} must be the forward's statistics of shape {stats_shape} and dtype "
                f"{stats_dtype}, got shape {tuple(t.shape)} and dtype {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected x's device {x.device}")
