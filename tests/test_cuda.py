"""The cuda backend on a GPU: every kernel path and dtype against the float64 reference
and the Triton backend; determinism, CUDA graphs, torch.compile, opcheck, empty tensors.

Skipped without a CUDA device. Where sa_kernels._cuda was not built, the first test builds
the extension (a few minutes, cached by torch).
"""
from contextlib import contextmanager
from typing import Callable, NamedTuple

import pytest
import torch

from helpers import (PARAM_NAMES, TOLERANCES, assert_close_to_reference,
                     assert_matches_reference, assert_rel_close, fused_outputs, random_input,
                     random_reference, reference_outputs)
from sa_kernels import FusedShuffleAttention
from sa_kernels.backends import cuda_ext, unavailable_reason

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
KERNEL_TYPE = {torch.float32: "float", torch.float64: "double", torch.float16: "__half",
               torch.bfloat16: "__nv_bfloat16"}
VEC = {torch.float32: 4, torch.float64: 2, torch.float16: 8, torch.bfloat16: 8}  # 16 bytes
EPS = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _cuda_backend():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = unavailable_reason("cuda", "cuda")
    if reason is not None:
        if cuda_ext.build_error() is not None:
            pytest.fail(reason)
        pytest.skip(reason)


def param_dtype(dtype):
    """float64 parameters for float64 x; float32 otherwise (the AMP case for half x)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- the kernel paths ----------------------------------------------------------------

class Case(NamedTuple):
    make_x: Callable  # dtype -> x on the GPU
    groups: int
    forward_kernel: tuple  # (name, template args after the element type); "V": 16 bytes of elements
    backward_kernel: tuple
    limit: int = -1  # register_plane_limit
    dy_format: torch.memory_format = torch.contiguous_format
    variant: int = 0  # the measurement hook (csrc/shuffle_attention.h, Variant)
    param_team: int = 32  # threads per parameter index in the parameter-gradient kernel


def _x(shape, memory_format=torch.contiguous_format):
    return lambda dtype: random_input(shape, dtype, "cuda", memory_format)


def _misaligned(shape):
    """Contiguous planes whose data pointer is one element past a 16-byte boundary."""
    def make(dtype):
        flat = random_input((torch.Size(shape).numel() + 1,), dtype, "cuda")
        return flat[1:].view(shape)
    return make


def _permuted(shape):
    """Dense but neither NCHW nor NHWC: stored as (B, H, C, W); empty_like keeps it."""
    b, c, h, w = shape
    return lambda dtype: random_input((b, h, c, w), dtype, "cuda").permute(0, 2, 1, 3)


def _sliced_w(shape):
    b, c, h, w = shape
    return lambda dtype: random_input((b, c, h, 2 * w), dtype, "cuda")[..., ::2]


def _channel_slice(shape, extra):
    b, c, h, w = shape
    return lambda dtype: random_input((b, c + 2 * extra, h, w), dtype, "cuda")[:, extra:extra + c]


LARGE_HW = {torch.float32: (96, 96), torch.float64: (72, 72), torch.float16: (128, 136),
            torch.bfloat16: (128, 136)}  # past 8 packs a thread of a block, inside 16 (forward)


def _large_held(dtype):
    return random_input((2, 8) + LARGE_HW[dtype], dtype, "cuda")


def has_clusters():
    return torch.cuda.get_device_capability() >= (9, 0)


def where_clusters(kernel):
    """``kernel`` where the device has thread-block clusters; elsewhere the forced variant
    falls back to the launcher's choice, which the case does not check."""
    return lambda dtype, hw: (kernel,) if has_clusters() else None


def held_vector(kernel, max_items):
    """The held kernel the launchers pick for 16-byte packs, as a spec for kernel_name: the
    smallest team (a warp, 2 or 4 warps, the block) holding the plane in 8 packs a thread,
    then 16 (forward only); past that a thread-block cluster holding the plane at 1024 packs
    a block (sm_90), else the two-sweep kernel. None where the device decides (clusters of 9
    to 16 blocks need its non-portable cluster sizes). A function of (dtype, H * W)."""
    def spec(dtype, hw):
        packs = hw // VEC[dtype]
        for team in (32, 64, 128, 256):
            if packs <= team * 8:
                return (kernel, "V", 8, team)
        if max_items >= 16 and packs <= 256 * 16:
            return (kernel, "V", 16, 256)
        blocks = -(-packs // 1024)
        if has_clusters() and blocks <= 8:
            return (kernel.replace("held", "plane_cluster"),)
        if has_clusters() and blocks <= 16:
            return None
        return (kernel.replace("held", "two_sweep"), "V", "false")
    return spec


# Variant fields (csrc/shuffle_attention.h, Variant): the measurement hook's integer.
PLANES_PER_PLANE, PLANES_STAGED, PLANES_CLUSTER = 1, 2, 3
REDUCE_WARP, REDUCE_BLOCK = 1 << 4, 2 << 4
PER_PLANE = dict(variant=PLANES_PER_PLANE)  # small planes that would be staged, per plane instead

HELD_F, HELD_B = "forward_held_kernel", "backward_held_kernel"
STAGED_F, STAGED_B = "forward_staged_kernel", "backward_staged_kernel"
PLANE_CLUSTER_F, PLANE_CLUSTER_B = "forward_plane_cluster_kernel", "backward_plane_cluster_kernel"
SWEEP_F, SWEEP_B = "forward_two_sweep_kernel", "backward_two_sweep_kernel"
NHWC_F, NHWC_B = "forward_channels_last_kernel", "backward_channels_last_kernel"
SPLIT_F, SPLIT_B = "forward_channels_last_split_kernel", "backward_channels_last_split_kernel"


def channels_last_kernel(direction, channels):
    """The split kernel where C/2 is a multiple of 16 bytes of elements, else the scalar one."""
    def spec(dtype, hw):
        split = (channels // 2) % VEC[dtype] == 0
        return (f"{direction}_channels_last_split_kernel" if split else f"{direction}_channels_last_kernel",)
    return spec


def cluster(blocks):
    """The variant forcing clusters of ``blocks`` blocks on the split kernels (1: no cluster)."""
    return blocks << 8
CL = torch.channels_last

CASES = {
    "warp_7x7": Case(_x((4, 32, 7, 7)), 4, (HELD_F, 1, 2, 32), (HELD_B, 1, 2, 32), **PER_PLANE),
    "warp_1x1": Case(_x((8, 16, 1, 1)), 2, (HELD_F, 1, 2, 32), (HELD_B, 1, 2, 32), **PER_PLANE),
    "warp_14x14": Case(_x((2, 48, 14, 14)), 4, (HELD_F, 1, 8, 32), (HELD_B, 1, 8, 32), **PER_PLANE),
    "staged_7x7": Case(_x((4, 32, 7, 7)), 4, (STAGED_F,), (STAGED_B,)),
    "staged_1x1": Case(_x((8, 16, 1, 1)), 2, (STAGED_F,), (STAGED_B,)),
    "staged_14x14_tiles": Case(_x((2, 96, 14, 14)), 4, (STAGED_F,), (STAGED_B,)),  # a short last tile
    "staged_16x32": Case(_x((2, 8, 16, 32)), 2, (STAGED_F,), (STAGED_B,)),  # the largest staged plane
    "staged_3x3": Case(_x((3, 32, 3, 3)), 2, (STAGED_F,), (STAGED_B,)),
    "block_vec": Case(_x((2, 16, 28, 32)), 2, held_vector(HELD_F, 16), held_vector(HELD_B, 8)),
    "team_vec": Case(_x((1, 12, 40, 50)), 3, held_vector(HELD_F, 16), held_vector(HELD_B, 8)),
    "team_vec_56x56": Case(_x((2, 8, 56, 56)), 2, held_vector(HELD_F, 16), held_vector(HELD_B, 8)),
    "team_vec_80x80": Case(_x((1, 8, 80, 80)), 2, held_vector(HELD_F, 16), held_vector(HELD_B, 8)),
    "block_vec_large": Case(_large_held, 2, held_vector(HELD_F, 16), held_vector(HELD_B, 8)),
    "block_scalar": Case(_x((2, 8, 31, 33)), 2, (HELD_F, 1, 4, 256), (HELD_B, 1, 4, 256)),
    "block_scalar_large": Case(_x((2, 4, 43, 47)), 1, (HELD_F, 1, 16, 256), (HELD_B, 1, 8, 256)),
    "misaligned": Case(_misaligned((2, 8, 32, 32)), 2, (HELD_F, 1, 4, 256), (HELD_B, 1, 4, 256)),
    "two_sweep_forced": Case(_x((2, 16, 24, 24)), 2, (SWEEP_F, "V", "false"), (SWEEP_B, "V", "false"), limit=0),
    "two_sweep_forced_scalar": Case(_x((2, 16, 9, 11)), 2, (SWEEP_F, 1, "false"), (SWEEP_B, 1, "false"), limit=0),
    "two_sweep_large": Case(_x((1, 4, 200, 200)), 1, (SWEEP_F, "V", "false"), (SWEEP_B, "V", "false"),
                            **PER_PLANE),
    "plane_cluster_large": Case(_x((2, 4, 160, 160)), 1, held_vector(HELD_F, 16), held_vector(HELD_B, 8)),
    "plane_cluster_forced": Case(_x((2, 8, 24, 40)), 2, where_clusters(PLANE_CLUSTER_F),
                                 where_clusters(PLANE_CLUSTER_B), variant=PLANES_CLUSTER | cluster(3)),
    "plane_cluster_forced_empty_blocks": Case(_x((2, 8, 2, 8)), 2, where_clusters(PLANE_CLUSTER_F),
                                              where_clusters(PLANE_CLUSTER_B),
                                              variant=PLANES_CLUSTER | cluster(4)),  # bf16: 2 packs
    "channels_last": Case(_x((4, 64, 14, 14), CL), 4, (SPLIT_F,), (SPLIT_B,), dy_format=CL),
    "channels_last_odd": Case(_x((2, 24, 7, 9), CL), 3, channels_last_kernel("forward", 24),
                              channels_last_kernel("backward", 24), dy_format=CL),
    "channels_last_scalar": Case(_x((2, 14, 5, 7), CL), 7, (NHWC_F,), (NHWC_B,), dy_format=CL),  # C/2 = 7
    # Few images and channels, many positions: the launcher's own cluster size (16 on an
    # H100 or H200: one work item for 132 multiprocessors), then forced sizes, none included.
    "cluster_auto": Case(_x((1, 32, 64, 64), CL), 4, (SPLIT_F,), (SPLIT_B,), dy_format=CL),
    "cluster_none": Case(_x((1, 32, 40, 40), CL), 4, (SPLIT_F,), (SPLIT_B,), dy_format=CL,
                         variant=cluster(1)),
    "cluster_2": Case(_x((2, 32, 13, 17), CL), 2, (SPLIT_F,), (SPLIT_B,), dy_format=CL, variant=cluster(2)),
    "cluster_3": Case(_x((1, 48, 9, 11), CL), 3, (SPLIT_F,), (SPLIT_B,), dy_format=CL, variant=cluster(3)),
    "cluster_8": Case(_x((1, 32, 40, 40), CL), 4, (SPLIT_F,), (SPLIT_B,), dy_format=CL, variant=cluster(8)),
    "cluster_16": Case(_x((1, 32, 40, 40), CL), 4, (SPLIT_F,), (SPLIT_B,), dy_format=CL,
                       variant=cluster(16)),
    "cluster_16_few_positions": Case(_x((1, 32, 3, 4), CL), 4, (SPLIT_F,), (SPLIT_B,), dy_format=CL,
                                     variant=cluster(16)),  # 12 positions: blocks without any
    "permuted": Case(_permuted((2, 16, 10, 12)), 2, (SWEEP_F, 1, "true"), (SWEEP_B, 1, "true")),
    "sliced_w": Case(_sliced_w((2, 16, 6, 9)), 2, (SWEEP_F, 1, "true"), (SWEEP_B, 1, "true")),
    "channel_slice": Case(_channel_slice((2, 16, 8, 8), 4), 2, (STAGED_F,), (STAGED_B,)),
    "channel_slice_per_plane": Case(_channel_slice((2, 16, 8, 8), 4), 2, (HELD_F, 1, 2, 32),
                                    (HELD_B, 1, 2, 32), **PER_PLANE),
    # B * G = 288 rows: a block per parameter index; then the same forced to a warp.
    "param_block": Case(_x((9, 64, 2, 3)), 32, (STAGED_F,), (STAGED_B,), param_team=256),
    "param_warp_forced": Case(_x((9, 64, 2, 3)), 32, (STAGED_F,), (STAGED_B,), variant=REDUCE_WARP),
    "param_block_forced": Case(_x((5, 160, 3, 3)), 8, (STAGED_F,), (STAGED_B,),
                               variant=REDUCE_BLOCK, param_team=256),
}


def kernel_name(spec, dtype, hw=None):
    """The kernel's name as the profiler shows it; None where the case leaves it to the device."""
    if callable(spec):
        spec = spec(dtype, hw)
    if spec is None:
        return None
    name, *args = spec
    args = [str(VEC[dtype]) if a == "V" else str(a) for a in args]
    return f"{name}<{', '.join([KERNEL_TYPE[dtype]] + args)}>"


def make_problem(case, dtype):
    x = case.make_x(dtype)
    channels = x.shape[1]
    ref = random_reference(channels, case.groups, "cuda", param_dtype(dtype))
    fused = FusedShuffleAttention.from_module(ref, backend="cuda")
    dy = random_input(x.shape, dtype, "cuda", case.dy_format)
    return ref, fused, x, dy


@contextmanager
def kernel_settings(case=None):
    """The case's test hooks (register_plane_limit, variant) for the duration of the block."""
    limit, variant = (-1, 0) if case is None else (case.limit, case.variant)
    with cuda_ext.register_plane_limit(limit):
        previous = torch.ops.sa_kernels.cuda_set_variant(int(variant))
        try:
            yield
        finally:
            torch.ops.sa_kernels.cuda_set_variant(previous)


def run_fused(fused, x, dy, case=None, call=None):
    """Like helpers.fused_outputs, but x reaches the op exactly as given: fused_outputs clones
    it, which re-aligns a misaligned view and makes a non-dense slice contiguous, so those
    cases would never reach their kernels. x.detach() shares storage, strides and offset.
    ``call`` runs the forward instead of ``fused`` (e.g. its torch.compile'd form)."""
    x = x.detach().requires_grad_()
    fused.zero_grad(set_to_none=True)
    with kernel_settings(case):
        out = (fused if call is None else call)(x)
        out.backward(dy)
    return out.detach(), x.grad, {n: p.grad for n, p in fused.named_parameters()}


REFERENCE_CASES = list(CASES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case_name", REFERENCE_CASES)
def test_matches_reference(case_name, dtype):
    case = CASES[case_name]
    ref, fused, x, dy = make_problem(case, dtype)
    assert_close_to_reference(ref, x, dy, run_fused(fused, x, dy, case))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case_name", list(CASES))
def test_matches_triton(case_name, dtype):
    reason = unavailable_reason("triton", "cuda")
    if reason is not None:
        pytest.skip(f"triton backend: {reason}")
    case = CASES[case_name]
    ref, fused, x, dy = make_problem(case, dtype)
    out, dx, grads = run_fused(fused, x, dy, case)
    t_out, t_dx, t_grads = run_fused(FusedShuffleAttention.from_module(ref, backend="triton"), x, dy)
    # Each is within TOLERANCES of the float64 reference, so of each other within twice that.
    tol = {k: 2 * v for k, v in TOLERANCES[dtype].items()}
    torch.testing.assert_close(out, t_out, **tol)
    torch.testing.assert_close(dx, t_dx, **tol)
    for name in PARAM_NAMES:
        assert_rel_close(grads[name], t_grads[name].to(torch.float64), 4e-5 if dtype != torch.float64 else 1e-10, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_by_one_planes(dtype):
    """Against the torch backend on the same GPU: the same closed form, exact zeros included."""
    case = CASES["warp_1x1"]
    ref, fused, x, dy = make_problem(case, dtype)
    out, dx, grads = run_fused(fused, x, dy)
    t_out, t_dx, t_grads = run_fused(FusedShuffleAttention.from_module(ref, backend="torch"), x, dy)
    torch.testing.assert_close(out, t_out, **TOLERANCES[dtype])
    torch.testing.assert_close(dx, t_dx, **TOLERANCES[dtype])
    for name in PARAM_NAMES:
        torch.testing.assert_close(grads[name], t_grads[name], **TOLERANCES[param_dtype(dtype)])
    assert not grads["gn.weight"].any()


def launched_kernels(fn):
    """Names of the sa_kernels CUDA kernels that fn launches, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "sa_kernels::detail::" in e.name]
    if not names:
        pytest.skip("the profiler recorded no CUDA kernel names here (CUPTI unavailable?)")
    return names


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case_name", list(CASES))
def test_path_choice(case_name, dtype):
    """The launcher picks the kernel this case is meant to cover."""
    case = CASES[case_name]
    _, fused, x, dy = make_problem(case, dtype)
    names = launched_kernels(lambda: run_fused(fused, x, dy, case))
    hw = x.shape[2] * x.shape[3]
    for expected in (kernel_name(case.forward_kernel, dtype, hw), kernel_name(case.backward_kernel, dtype, hw),
                     f"param_grad_kernel<{KERNEL_TYPE[dtype]}, {case.param_team}>"):
        if expected is not None:
            assert sum(expected in n for n in names) == 1, f"expected one {expected}, launched {names}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case_name", list(CASES))
def test_bitwise_deterministic(case_name, dtype):
    case = CASES[case_name]
    _, fused, x, dy = make_problem(case, dtype)
    first = run_fused(fused, x, dy, case)
    second = run_fused(fused, x, dy, case)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name in PARAM_NAMES:
        assert torch.equal(first[2][name], second[2][name]), name


def test_half_precision_parameters():
    """float16 parameters give the same float32 maths as their float32 copies, rounded once."""
    ref = random_reference(32, 4, "cuda", torch.float16)
    fused16 = FusedShuffleAttention.from_module(ref, backend="cuda")
    fused32 = FusedShuffleAttention.from_module(ref, backend="cuda").float()
    x = random_input((2, 32, 9, 9), torch.float16, "cuda")
    dy = random_input(x.shape, torch.float16, "cuda")
    out16, dx16, grads16 = fused_outputs(fused16, x, dy)
    out32, dx32, grads32 = fused_outputs(fused32, x, dy)
    assert torch.equal(out16, out32) and torch.equal(dx16, dx32)
    for name in PARAM_NAMES:
        assert grads16[name].dtype == torch.float16
        assert torch.equal(grads16[name], grads32[name].to(torch.float16)), name


@pytest.mark.parametrize("make_dy", [
    lambda x: None,  # out.sum().backward(): grad_out expanded from a scalar
    lambda x: random_input(x.shape, x.dtype, "cuda", torch.channels_last),
    lambda x: random_input(x.shape[:2] + (x.shape[3], x.shape[2]), x.dtype, "cuda").transpose(2, 3),
    lambda x: random_input((1, 1) + x.shape[2:], x.dtype, "cuda").expand(x.shape),
], ids=["sum", "channels_last", "transposed", "expanded_bc"])
@pytest.mark.parametrize("x_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_grad_out_with_any_strides(make_dy, x_format):
    ref = random_reference(32, 4, "cuda")
    fused = FusedShuffleAttention.from_module(ref, backend="cuda")
    x = random_input((2, 32, 10, 7), torch.float32, "cuda", x_format)
    dy = make_dy(x)
    if dy is None:
        xg = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        fused(xg).sum().backward()
        dy = torch.ones_like(x)
        _, ref_dx, ref_grads = reference_outputs(ref, x, dy)
        torch.testing.assert_close(xg.grad.double(), ref_dx, **TOLERANCES[torch.float32])
        for name in PARAM_NAMES:
            assert_rel_close(fused.get_parameter(name).grad, ref_grads[name], 2e-5, name)
    else:
        assert_matches_reference(ref, fused, x, dy)


# ---- integration: graphs, compile, opcheck, streams ------------------------------------

@pytest.mark.parametrize("case_name", ["warp_7x7", "staged_7x7", "block_vec", "channels_last", "cluster_auto",
                                       "cluster_8", "two_sweep_forced", "permuted"])
def test_cuda_graph_capture_and_replay(case_name):
    case = CASES[case_name]
    ref, fused, x, dy = make_problem(case, torch.float32)
    static_x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    static_dy = dy.clone(memory_format=torch.preserve_format)

    with kernel_settings(case):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the capture
            for _ in range(2):
                fused.zero_grad(set_to_none=True)
                static_x.grad = None
                fused(static_x).backward(static_dy)
        torch.cuda.current_stream().wait_stream(side)

        graph = torch.cuda.CUDAGraph()
        fused.zero_grad(set_to_none=True)
        static_x.grad = None
        with torch.cuda.graph(graph):
            static_out = fused(static_x)
            static_out.backward(static_dy)

    for _ in range(2):
        with torch.no_grad():
            static_x.copy_(random_input(x.shape, x.dtype, "cuda"))
            static_dy.copy_(random_input(x.shape, x.dtype, "cuda"))
        graph.replay()
        torch.cuda.synchronize()
        eager = FusedShuffleAttention.from_module(ref, backend="cuda")
        out, dx, grads = run_fused(eager, static_x.detach(), static_dy, case)
        assert torch.equal(static_out, out)
        assert torch.equal(static_x.grad, dx)
        for name in PARAM_NAMES:
            assert torch.equal(fused.get_parameter(name).grad, grads[name]), name


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_compile_fullgraph(memory_format, dtype):
    ref = random_reference(64, 8, "cuda")
    fused = FusedShuffleAttention.from_module(ref, backend="cuda")
    x = random_input((2, 64, 12, 12), dtype, "cuda", memory_format)
    dy = random_input(x.shape, dtype, "cuda", memory_format)
    eager_out, eager_dx, eager_grads = run_fused(fused, x, dy)
    out, dx, grads = run_fused(fused, x, dy, call=torch.compile(fused, fullgraph=True))
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, eager_out, **tol)
    torch.testing.assert_close(dx, eager_dx, **tol)
    for name in PARAM_NAMES:
        assert_rel_close(grads[name], eager_grads[name].to(torch.float64), 2e-5, name)


@pytest.mark.parametrize("case_name", ["warp_7x7", "block_vec", "channels_last", "permuted", "two_sweep_forced"])
def test_opcheck(case_name):
    case = CASES[case_name]
    x = case.make_x(torch.float32)
    half = x.shape[1] // (2 * case.groups)
    params = [torch.randn(half, device="cuda") * 0.8 + 0.2 for _ in range(6)]
    dy = random_input(x.shape, torch.float32, "cuda", case.dy_format)
    with kernel_settings(case):
        torch.library.opcheck(torch.ops.sa_kernels.shuffle_attention.default, (x, *params, case.groups, EPS))
        _, mean, rstd = torch.ops.sa_kernels.shuffle_attention(x, *params, case.groups, EPS)
        torch.library.opcheck(torch.ops.sa_kernels.shuffle_attention_backward.default,
                              (dy, x, *params, mean, rstd, case.groups, EPS))
        # The public op on this backend, with its autograd registration.
        grad_params = [p.clone().requires_grad_() for p in params]
        torch.library.opcheck(torch.ops.sa_kernels.forward.default,
                              (x, *grad_params, case.groups, EPS, "cuda"))


@pytest.mark.parametrize("shape", [(0, 16, 8, 8), (2, 16, 0, 8), (2, 16, 8, 0)])
def test_empty_tensors(shape):
    ref = random_reference(16, 2, "cuda")
    fused = FusedShuffleAttention.from_module(ref, backend="cuda")
    x = torch.empty(shape, device="cuda", requires_grad=True)
    out = fused(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    for name in PARAM_NAMES:
        grad = fused.get_parameter(name).grad
        assert grad is not None and not grad.any(), name
    params = [p.detach().reshape(-1) for p in (fused.cweight, fused.cbias, fused.sweight, fused.sbias,
                                               fused.gn.weight, fused.gn.bias)]
    _, mean, rstd = torch.ops.sa_kernels.shuffle_attention(x.detach(), *params, 2, EPS)
    assert mean.shape == shape[:2] and not mean.any() and not rstd.any()


def test_side_stream():
    """The kernels run on the current stream: queued behind a busy side stream, they see its writes."""
    x = random_input((4, 32, 14, 14), torch.float32, "cuda")
    dy = random_input(x.shape, torch.float32, "cuda")
    params = [torch.randn(4, device="cuda") * 0.8 + 0.2 for _ in range(6)]
    out, mean, rstd = torch.ops.sa_kernels.shuffle_attention(x, *params, 4, EPS)
    grads = torch.ops.sa_kernels.shuffle_attention_backward(dy, x, *params, mean, rstd, 4, EPS)

    x_side, dy_side = torch.zeros_like(x), torch.zeros_like(dy)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # Kernels wrongly sent to another stream would run during the sleep, before the copies.
        torch.cuda._sleep(50_000_000)
        x_side.copy_(x)
        dy_side.copy_(dy)
        out_side, mean_side, rstd_side = torch.ops.sa_kernels.shuffle_attention(x_side, *params, 4, EPS)
        grads_side = torch.ops.sa_kernels.shuffle_attention_backward(dy_side, x_side, *params, mean_side, rstd_side, 4, EPS)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out_side, out) and torch.equal(mean_side, mean)
    for a, b in zip(grads_side, grads):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    ref = random_reference(32, 4, "cuda:1")
    fused = FusedShuffleAttention.from_module(ref, backend="cuda")
    assert_matches_reference(ref, fused, random_input((2, 32, 9, 9), torch.float32, "cuda:1"))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_offsets_beyond_2_31(memory_format):
    """More than 2^31 elements: the last image, past the int32 range, is checked against the torch backend."""
    from sa_kernels.backends import torch_math

    shape = (1100, 2, 1000, 1000)  # 2.2e9 float16 elements, 4.4 GB per tensor
    free, _ = torch.cuda.mem_get_info()
    if free < 5 * 4.4e9:
        pytest.skip("needs about 22 GB of free GPU memory")
    x = torch.randn(shape, dtype=torch.float16, device="cuda").contiguous(memory_format=memory_format)
    params = [torch.randn(1, device="cuda") * 0.8 + 0.2 for _ in range(6)]
    out, mean, rstd = torch.ops.sa_kernels.shuffle_attention(x, *params, 1, EPS)
    dy = torch.randn_like(x)
    dx = torch.ops.sa_kernels.shuffle_attention_backward(dy, x, *params, mean, rstd, 1, EPS)[0]
    tail = slice(shape[0] - 2, shape[0])
    ref_out, ref_mean, ref_rstd = torch_math.forward(x[tail], *params, 1, EPS)
    torch.testing.assert_close(out[tail], ref_out.to(torch.float16), **TOLERANCES[torch.float16])
    torch.testing.assert_close(mean[tail], ref_mean, atol=1e-5, rtol=1e-5)
    ref_dx = torch_math.backward(dy[tail], x[tail], *params, ref_mean, ref_rstd, 1, EPS)[0]
    torch.testing.assert_close(dx[tail], ref_dx, **TOLERANCES[torch.float16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cluster_sizes_agree(dtype):
    """The same channels_last problem split over 1, 2, 4, 8 and 16 blocks a cluster: each within
    the reference's tolerance (test_matches_reference), and all within rounding of each other.
    Where the device has no clusters every size runs unsplit: the check still holds."""
    ref = random_reference(64, 4, "cuda", param_dtype(dtype))
    fused = FusedShuffleAttention.from_module(ref, backend="cuda")
    x = random_input((2, 64, 48, 40), dtype, "cuda", CL)
    dy = random_input(x.shape, dtype, "cuda", CL)
    results = {}
    for blocks in (1, 2, 4, 8, 16):
        case = Case(lambda d: x, 4, (SPLIT_F,), (SPLIT_B,), dy_format=CL, variant=cluster(blocks))
        results[blocks] = run_fused(fused, x, dy, case)
    tol = {k: 2 * v for k, v in TOLERANCES[dtype].items()}
    for blocks, (out, dx, grads) in results.items():
        torch.testing.assert_close(out, results[1][0], **tol, msg=lambda m: f"{blocks} blocks, out: {m}")
        torch.testing.assert_close(dx, results[1][1], **tol, msg=lambda m: f"{blocks} blocks, dx: {m}")
        for name in PARAM_NAMES:
            assert_rel_close(grads[name], results[1][2][name].to(torch.float64), 4e-5, name)
