"""Argument checks shared by the module, the functional form and the ops.

Every check runs on the host from shapes, dtypes and devices only, so it costs
no device synchronisation and also runs on fake tensors under torch.compile.
"""
import torch

PARAM_NAMES = ("cweight", "cbias", "sweight", "sbias", "gn_weight", "gn_bias")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if len(params) != len(PARAM_NAMES):
        raise ValueError(f"expected {len(PARAM_NAMES)} parameters {PARAM_NAMES}, got {len(params)}")
    half = params[0].numel()
    expected_c = 2 * groups * half
    if x.shape[1] != expected_c:
        raise ValueError(
            f"x has {x.shape[1]} channels, expected 2 * G * half = 2 * {groups} * {half} = "
            f"{expected_c} (shape {tuple(x.shape)})")
    for name, p in zip(PARAM_NAMES, params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device}, expected x's device {x.device}")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must have a floating dtype, got {p.dtype}")
        if p.numel() != half:
            raise ValueError(
                f"{name} has {p.numel()} elements (shape {tuple(p.shape)}), expected half = {half}")
