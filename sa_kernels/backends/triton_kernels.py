"""The triton backend: one-pass fused Shuffle Attention kernels written in Triton.

* forward: ONE launch (``sa_kernels/triton/forward.py``). Each program owns a
  block of channel pairs (input channels j and C/2 + j, whose outputs 2j and
  2j + 1 are adjacent) of one sample, computes each plane's mean and rstd
  (float32, float64 for float64 x), gates the plane and writes it straight to
  its shuffled output channel, plus the (B, C) statistics.
* backward: TWO or THREE launches. ``triton/backward.py`` recomputes the gate
  from x and the saved statistics, writes dx and per-plane float32 (float64)
  partial sums into a (2, B, C) workspace; ``triton/param_grads.py`` reduces
  them over (batch, group) in a fixed order into the six parameter gradients
  (in two stages when B * G passes 1024 rows). No atomics: gradients are
  bitwise reproducible.
* split planes (channels_last with too few (sample, channel block) programs to
  fill the GPU): H*W is cut into slices; forward and backward each take a
  launch of per-slice partials and a launch that merges them in a fixed order
  and writes its slice (``triton/forward_split.py``, ``triton/backward_split.py``).

Launch heuristic (``triton/launch_config.py``, keyed on H*W, C, B, dtype and layout):
channels_last x gets programs owning a block of channels (>= one 32-byte sector,
up to 32 pairs) across the plane, with the shuffled output (and grad_out)
accessed as one interleaved, contiguous tile; other layouts get one pair per
program, several pairs when planes are small (7x7, 8x8, 14x14: up to 4096 tile
values, keeping >= 512 programs). A tile that fits 16384 register values (x
elements, times 2 in backward for grad_out, times 2 for float64) is processed
in one sweep; larger planes (e.g. 112x112 and up in NCHW, 56x56 channels_last)
take the chunked two-sweep path (Chan-merged statistics, then gate) in chunks
of up to 4096 values. num_warps: one warp per 256 tile values, fewer where
that leaves each thread a 16-byte vector, 1 to 16. No benchmarking at first
call, so launches never sync the host and can be captured in CUDA graphs.
``launch_config.LIMITS`` holds every threshold (tests lower them to reach the
packed, chunked and split paths with tiny shapes); ``launch_config.override``
and ``launch_config.TUNED`` force plans (the GPU sweep, measured best plans).

Layouts: x, out, grad_out and dx are addressed through their own strides (NCHW,
channels_last and any other 4-D strides, e.g. ``x[:, :, ::2]``, or grad_out
expanded from a scalar); nothing is copied. ``out`` and ``dx`` are
``torch.empty_like(x)``. The only copies are of non-contiguous 1-D parameter
views (``half`` values each).

Host cost: everything derivable from (shape, strides, dtypes, device, groups,
eps, launch settings) - the plan, the kernels' scalar arguments and
specialisation flags, the grid - is computed once per key and cached
(``_forward_launches``, ``_backward_launches``). A call then does one dict
lookup, allocates its outputs and launches each kernel through a
``KernelLaunch`` (``triton/launcher.py``), which on a GPU skips Triton's
per-call argument binding after the first launch.
"""
import os
import struct

import torch

from ..triton import launch_config
from ..triton.launcher import KernelLaunch

_INT32_LIMIT = 2 ** 31 - 1
_kernels = None
_split_kernels = None


def _load_kernels():
    """The Triton kernels, imported on first use (importing them imports Triton)."""
    global _kernels
    if _kernels is None:
        from ..triton.backward import shuffle_attention_backward_kernel
        from ..triton.forward import shuffle_attention_forward_kernel
        from ..triton.param_grads import shuffle_attention_param_grads_kernel
        _kernels = (shuffle_attention_forward_kernel, shuffle_attention_backward_kernel,
                    shuffle_attention_param_grads_kernel)
    return _kernels


def _load_split_kernels():
    """The split-plane kernels (forward partials, apply; backward partials, apply)."""
    global _split_kernels
    if _split_kernels is None:
        from ..triton.backward_split import (shuffle_attention_backward_apply_kernel,
                                             shuffle_attention_backward_partials_kernel)
        from ..triton.forward_split import (shuffle_attention_forward_apply_kernel,
                                            shuffle_attention_forward_partials_kernel)
        _split_kernels = (shuffle_attention_forward_partials_kernel,
                          shuffle_attention_forward_apply_kernel,
                          shuffle_attention_backward_partials_kernel,
                          shuffle_attention_backward_apply_kernel)
    return _split_kernels


def unavailable_reason(device, build=True):
    """None when the kernels can run on ``device``; otherwise why, and the fix.

    Triton compiles each kernel on first use (and caches it on disk); there is no
    ahead-of-time build, so ``build`` makes no difference.
    """
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not installed ({e}); install it with `pip install triton`"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU is available to PyTorch"
        try:
            from triton.runtime import driver
            driver.active.get_current_device()
        except Exception as e:  # no usable GPU driver for Triton
            return f"Triton found no active GPU driver ({type(e).__name__}: {e})"
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ("Triton needs a CUDA GPU; to test on CPU, set TRITON_INTERPRET=1 before "
                    "triton is first imported")
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(_load_kernels()[0], InterpretedFunction):
            return ("TRITON_INTERPRET=1 was set after the kernels were compiled for a GPU; set it "
                    "before triton (or torch._dynamo) is first imported")
        return None
    return f"Triton kernels run on CUDA devices (or on CPU under TRITON_INTERPRET=1), not {device.type}"


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _spatial(t):
    """(flat, s_h, s_w) for the kernels' ``spatial_offsets``: flat planes get their single step in s_w."""
    _, _, H, W = t.shape
    s_h, s_w = t.stride(2), t.stride(3)
    if W == 1:
        return True, s_h, s_h
    if H == 1 or s_h == W * s_w:
        return True, s_h, s_w
    return False, s_h, s_w


def _needs_int64(*tensors):
    """Whether a channel offset or an in-plane offset can pass int32 (sample offsets are always int64)."""
    for t in tensors:
        _, C, H, W = t.shape
        if max((C - 1) * t.stride(1), (H - 1) * t.stride(2) + (W - 1) * t.stride(3)) > _INT32_LIMIT:
            return True
    return False


def _vec(cap, hw, elem_size, *tensors):
    """Elements per vector (at most 16 bytes, at most ``cap``) that divide H*W and every
    tensor's sample and channel strides, for planes addressed as one unit-step run; else 1.
    The kernels receive those values divided by it (``plane_math.times_vec``)."""
    values = [hw]
    for t in tensors:
        flat, _, s_w = _spatial(t)
        if not flat or s_w != 1:
            return 1
        values += [t.stride(0), t.stride(1)]
    if max(values) > _INT32_LIMIT:
        return 1
    vec = min(cap, max(1, 16 // elem_size))
    while vec > 1 and any(v % vec for v in values):
        vec //= 2
    return vec


def _channels_fast(t):
    """Channels are the contiguous axis (channels_last, or 1x1 planes): tiles run along channels."""
    return t.stride(1) == 1 and t.shape[1] > 1


def _eps_halves(eps):
    """eps as float32 hi + lo: Triton passes Python floats as float32; hi + lo restores float64 eps."""
    hi = struct.unpack("f", struct.pack("f", eps))[0]
    return hi, eps - hi


def _params(params):
    # Kernels index parameters with unit stride; only a strided 1-D view gets a (tiny) copy.
    return [p if p.stride(0) == 1 else p.contiguous() for p in params]


# ---------------------------------------------------------------------------------------------
# Launches cached per key. A key holds everything the plan, the kernels' scalar arguments and
# their specialisation depend on; the values are built by the ``_plan_*`` functions below from
# the first call's tensors (``torch.empty_like(x)`` is a function of x's shape and strides, so
# out's and dx's strides are too).

_CACHE_LIMIT = 4096  # distinct keys kept before a cache is emptied (shapes seen by one process)
_forward_launches = {}
_backward_launches = {}


def clear_caches():
    """Forget every cached launch (tests that spy on planning call this first)."""
    _forward_launches.clear()
    _backward_launches.clear()


def _remember(cache, key, value):
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return value


class _Launches:
    """One call's kernel launches in order, each given one of the call's tensor lists (its
    role), with the device made current if it is not."""

    __slots__ = ("device_index", "launches")

    def __init__(self, device, launches):
        self.device_index = device.index if device.type == "cuda" else None
        self.launches = tuple(launches)  # (KernelLaunch, role) pairs

    def run(self, tensor_lists):
        if self.device_index is None or torch.cuda.current_device() == self.device_index:
            for launch, role in self.launches:
                launch(*tensor_lists[role])
        else:
            with torch.cuda.device(self.device_index):
                for launch, role in self.launches:
                    launch(*tensor_lists[role])


def _waves(plan):
    """(first unit, units) of each launch pair of a split plan, in order."""
    groups = plan.grid[0] // plan.splits
    per_wave = -(-groups // plan.waves)
    return [(g * plan.splits, (min(groups, g + per_wave) - g) * plan.splits)
            for g in range(0, groups, per_wave)]


class _ForwardPlan:
    __slots__ = ("acc", "stats_shape", "part_shape", "launches")


# Tensor lists (roles) of a forward call.
_FWD_PLANES, _FWD_PARTIALS, _FWD_APPLY = 0, 1, 2


def _plan_forward(x, out, params, eps):
    B, C, H, W = x.shape
    half = params[0].numel()
    acc = _acc_dtype(x.dtype)
    plan = launch_config.plan_planes(B, C // 2, H * W, x.element_size(), acc == torch.float64,
                                     _channels_fast(x), tensors=1)
    x_flat, x_sh, x_sw = _spatial(x)
    o_flat, o_sh, o_sw = _spatial(out)
    eps_hi, eps_lo = _eps_halves(float(eps))
    direct = x.is_cuda
    x_strides = (x.stride(0), x.stride(1), x_sh, x_sw)
    o_strides = (out.stride(0), out.stride(1), o_sh, o_sw)
    i64 = _needs_int64(x, out)
    result = _ForwardPlan()
    result.acc = acc
    result.stats_shape = (B, C)
    result.part_shape = None
    if plan.splits == 1:
        vec = _vec(plan.vec, H * W, x.element_size(), x, out)
        launches = [(KernelLaunch(
            _load_kernels()[0], plan.grid, 10,
            (C // 2, H * W // vec, W, half, eps_hi, eps_lo, plan.num_jblocks,
             x.stride(0) // vec, x.stride(1) // vec, x_sh, x_sw,
             out.stride(0) // vec, out.stride(1) // vec, o_sh, o_sw),
            dict(BLOCK_J=plan.block_j, BLOCK_HW=plan.block_hw, CHUNKED=plan.chunked,
                 X_FLAT=x_flat, OUT_FLAT=o_flat, OUT_INTERLEAVED=_channels_fast(out), I64=i64,
                 VEC=vec),
            plan.num_warps, direct), _FWD_PLANES)]
    else:
        partials_kernel, apply_kernel = _load_split_kernels()[:2]
        result.part_shape = (2, plan.splits, B, C)
        launches = []
        for first, count in _waves(plan):
            launches.append((KernelLaunch(
                partials_kernel, (count,), 2,
                (C // 2, H * W, W, plan.num_jblocks, plan.splits, plan.slice_len, first, B * C,
                 *x_strides),
                dict(BLOCK_J=plan.block_j, BLOCK_HW=plan.block_hw, X_FLAT=x_flat, I64=i64),
                plan.num_warps, direct), _FWD_PARTIALS))
            launches.append((KernelLaunch(
                apply_kernel, (count,), 11,
                (C // 2, H * W, W, half, eps_hi, eps_lo, plan.num_jblocks, plan.splits,
                 plan.slice_len, first, count, B * C, *x_strides, *o_strides),
                dict(BLOCK_J=plan.block_j, BLOCK_HW=plan.block_hw, X_FLAT=x_flat,
                     OUT_FLAT=o_flat, OUT_INTERLEAVED=_channels_fast(out), I64=i64),
                plan.num_warps, direct), _FWD_APPLY))
    result.launches = _Launches(x.device, launches)
    return result


def forward(x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps):
    params = (cweight, cbias, sweight, sbias, gn_weight, gn_bias)
    out = torch.empty_like(x)
    if x.numel() == 0:
        zeros = x.new_zeros(x.shape[:2], dtype=_acc_dtype(x.dtype))
        return out, zeros, zeros.clone()
    key = (x.shape, x.stride(), x.dtype, x.device, groups, eps,
           tuple([p.dtype for p in params]), launch_config.settings())
    plan = _forward_launches.get(key)
    if plan is None:
        plan = _remember(_forward_launches, key, _plan_forward(x, out, params, eps))
    mean = torch.empty(plan.stats_shape, dtype=plan.acc, device=x.device)
    rstd = torch.empty_like(mean)
    params = _params(params)
    if plan.part_shape is None:
        plan.launches.run(((x, out, mean, rstd, *params),))
    else:
        part = torch.empty(plan.part_shape, dtype=plan.acc, device=x.device)
        plan.launches.run((None, (x, part), (x, out, mean, rstd, part, *params)))
    return out, mean, rstd


class _BackwardPlan:
    __slots__ = ("ws_numel", "part_numel", "launches")


# Tensor lists (roles) of a backward call.
_BWD_PLANES, _BWD_PARTIALS, _BWD_APPLY, _BWD_REDUCE, _BWD_REDUCE_FINAL = 0, 1, 2, 3, 4


def _plan_backward(grad_out, x, dx, params, groups):
    B, C, H, W = x.shape
    half = params[0].numel()
    acc = _acc_dtype(x.dtype)
    plan = launch_config.plan_planes(B, C // 2, H * W, x.element_size(), acc == torch.float64,
                                     _channels_fast(x), tensors=2)
    x_flat, x_sh, x_sw = _spatial(x)
    dy_flat, dy_sh, dy_sw = _spatial(grad_out)
    dx_flat, dx_sh, dx_sw = _spatial(dx)
    direct = x.is_cuda
    x_strides = (x.stride(0), x.stride(1), x_sh, x_sw)
    dy_strides = (grad_out.stride(0), grad_out.stride(1), dy_sh, dy_sw)
    dx_strides = (dx.stride(0), dx.stride(1), dx_sh, dx_sw)
    i64 = _needs_int64(x, grad_out, dx)
    dy_interleaved = _channels_fast(grad_out)
    _, backward_kernel, param_grads_kernel = _load_kernels()
    if plan.splits == 1:
        vec = _vec(plan.vec, H * W, x.element_size(), x, grad_out, dx)
        launches = [(KernelLaunch(
            backward_kernel, plan.grid, 12,
            (C // 2, H * W // vec, W, half, plan.num_jblocks, B * C,
             x.stride(0) // vec, x.stride(1) // vec, x_sh, x_sw,
             grad_out.stride(0) // vec, grad_out.stride(1) // vec, dy_sh, dy_sw,
             dx.stride(0) // vec, dx.stride(1) // vec, dx_sh, dx_sw),
            dict(BLOCK_J=plan.block_j, BLOCK_HW=plan.block_hw, CHUNKED=plan.chunked,
                 X_FLAT=x_flat, DY_FLAT=dy_flat, DX_FLAT=dx_flat,
                 DY_INTERLEAVED=dy_interleaved, I64=i64, VEC=vec),
            plan.num_warps, direct), _BWD_PLANES)]
    else:
        partials_kernel, apply_kernel = _load_split_kernels()[2:]
        launches = []
        for first, count in _waves(plan):
            launches.append((KernelLaunch(
                partials_kernel, (count,), 11,
                (C // 2, H * W, W, half, plan.num_jblocks, plan.splits, plan.slice_len, first,
                 B * C, *x_strides, *dy_strides),
                dict(BLOCK_J=plan.block_j, BLOCK_HW=plan.block_hw, X_FLAT=x_flat,
                     DY_FLAT=dy_flat, DY_INTERLEAVED=dy_interleaved, I64=i64),
                plan.num_warps, direct), _BWD_PARTIALS))
            launches.append((KernelLaunch(
                apply_kernel, (count,), 12,
                (C // 2, H * W, W, half, plan.num_jblocks, plan.splits, plan.slice_len, first,
                 count, B * C, *x_strides, *dy_strides, *dx_strides),
                dict(BLOCK_J=plan.block_j, BLOCK_HW=plan.block_hw, X_FLAT=x_flat,
                     DY_FLAT=dy_flat, DX_FLAT=dx_flat, DY_INTERLEAVED=dy_interleaved, I64=i64),
                plan.num_warps, direct), _BWD_APPLY))
    # ws (2, splits, B, C) as (2, rows, 2 * half): its rows are (slice, batch, group) triples.
    rows = plan.splits * B * groups
    ws_stride = plan.splits * B * C
    reduce_plan = launch_config.plan_param_grads(rows, half)
    if reduce_plan.final is None:
        launches.append((KernelLaunch(
            param_grads_kernel, reduce_plan.grid, 11,
            (rows, half, ws_stride, reduce_plan.rows_per_chunk, 0),
            dict(BLOCK_R=reduce_plan.block_r, BLOCK_P=reduce_plan.block_p, FINAL=True),
            reduce_plan.num_warps, direct), _BWD_REDUCE))
        part_numel = 0
    else:
        # Two stages: chunks of rows into partials (2, chunks, 2 * half) after ws, then those.
        chunks = reduce_plan.grid[1]
        final = reduce_plan.final
        part_numel = 2 * chunks * 2 * half
        launches.append((KernelLaunch(
            param_grads_kernel, reduce_plan.grid, 11,
            (rows, half, ws_stride, reduce_plan.rows_per_chunk, chunks * 2 * half),
            dict(BLOCK_R=reduce_plan.block_r, BLOCK_P=reduce_plan.block_p, FINAL=False),
            reduce_plan.num_warps, direct), _BWD_REDUCE))
        launches.append((KernelLaunch(
            param_grads_kernel, final.grid, 11,
            (chunks, half, chunks * 2 * half, final.rows_per_chunk, 0),
            dict(BLOCK_R=final.block_r, BLOCK_P=final.block_p, FINAL=True),
            final.num_warps, direct), _BWD_REDUCE_FINAL))
    result = _BackwardPlan()
    result.ws_numel = 2 * ws_stride
    result.part_numel = part_numel
    result.launches = _Launches(x.device, launches)
    return result


def backward(grad_out, x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, mean, rstd,
             groups, eps):
    params = (cweight, cbias, sweight, sbias, gn_weight, gn_bias)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return (dx,) + tuple(torch.zeros(p.shape, dtype=p.dtype, device=p.device) for p in params)
    key = (x.shape, x.stride(), x.dtype, grad_out.stride(), grad_out.dtype, x.device, groups,
           tuple([p.dtype for p in params]), launch_config.settings())
    plan = _backward_launches.get(key)
    if plan is None:
        plan = _remember(_backward_launches, key, _plan_backward(grad_out, x, dx, params, groups))
    grads = [torch.empty_like(p) for p in params]
    # Saved statistics come from the ops (contiguous (B, C)); another backend's are too.
    mean, rstd = mean.contiguous(), rstd.contiguous()
    params = _params(params)
    ws_numel = plan.ws_numel
    ws = torch.empty(ws_numel + plan.part_numel, dtype=mean.dtype, device=x.device)
    part = ws[ws_numel:] if plan.part_numel else ws
    reduce_params = (params[2], params[4], params[5], *grads)
    plan.launches.run(((grad_out, x, dx, mean, rstd, ws, *params),
                       (grad_out, x, mean, rstd, ws, *params),
                       (grad_out, x, dx, mean, rstd, ws, *params),
                       (ws, part, *reduce_params),
                       (part, part, *reduce_params)))
    return (dx,) + tuple(grads)
