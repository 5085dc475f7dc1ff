"""The triton backend: every kernel path, forward and all gradients, against the float64 reference.

Runs on CPU tensors under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU) and on CUDA tensors when a GPU is
present. Shapes are tiny because an interpreted program costs about a
millisecond; ``launch_config.LIMITS`` is lowered where a test needs the
packed or chunked path on such shapes, and each test asserts (through the
``launches`` spy) that the path it is named after really ran.
"""
import os
import subprocess
import sys

import pytest
import torch

import sa_kernels
from helpers import (PARAM_GRAD_RTOL, PARAM_NAMES, TOLERANCES, assert_matches_reference,
                     assert_rel_close, fused_outputs, random_input, random_reference,
                     reference_outputs)
from sa_kernels import FusedShuffleAttention
from sa_kernels.backends import triton_kernels
from sa_kernels.triton import launch_config

CL = torch.channels_last
NCHW = torch.contiguous_format


@pytest.fixture
def tdevice(device):
    """The ``device`` fixture, skipped where the triton backend cannot run."""
    reason = sa_kernels.backends.unavailable_reason("triton", device)
    if reason is not None:
        pytest.skip(reason)
    return device


class Launches:
    """What the backend did: the plans it chose and the strides it was handed."""

    def __init__(self):
        self.plans = {1: [], 2: []}  # tensors held per element: 1 forward, 2 backward
        self.flat = []               # (name, flat) per tensor addressed
        self.grad_out_strides = []

    @property
    def forward(self):
        assert self.plans[1], "the triton forward did not run"
        return self.plans[1][-1]

    @property
    def backward(self):
        assert self.plans[2], "the triton backward did not run"
        return self.plans[2][-1]

    def both(self):
        return self.forward, self.backward


@pytest.fixture
def launches(monkeypatch):
    """Records every plan made; the backend's launch caches start (and end) empty, so each
    call of the test plans afresh under the test's limits and patches."""
    record = Launches()
    triton_kernels.clear_caches()
    plan_planes, spatial, backward = (launch_config.plan_planes, triton_kernels._spatial,
                                      triton_kernels.backward)

    def plan_spy(*args, **kwargs):
        plan = plan_planes(*args, **kwargs)
        record.plans[kwargs["tensors"]].append(plan)
        return plan

    def spatial_spy(t):
        result = spatial(t)
        record.flat.append(result[0])
        return result

    def backward_spy(grad_out, *args):
        record.grad_out_strides.append(grad_out.stride())
        return backward(grad_out, *args)

    monkeypatch.setattr(launch_config, "plan_planes", plan_spy)
    monkeypatch.setattr(triton_kernels, "_spatial", spatial_spy)
    monkeypatch.setattr(triton_kernels, "backward", backward_spy)
    yield record
    triton_kernels.clear_caches()


@pytest.fixture
def limits(monkeypatch):
    """Call with Limits fields to override the launch heuristic's thresholds for one test."""
    def set_limits(**kwargs):
        monkeypatch.setattr(launch_config, "LIMITS", launch_config.Limits(**kwargs))
    return set_limits


def _default_param_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _modules(channels, G, device, param_dtype):
    ref = random_reference(channels, G, device, param_dtype)
    return ref, FusedShuffleAttention.from_module(ref, backend="triton")


def check(shape, G, dtype, device, memory_format=NCHW, dy_format=None, param_dtype=None):
    """assert_matches_reference for a fresh random module and input; returns (out, dx, grads)."""
    ref, fused = _modules(shape[1], G, device, param_dtype or _default_param_dtype(dtype))
    x = random_input(shape, dtype, device, memory_format)
    dy = None if dy_format is None else random_input(shape, dtype, device, dy_format)
    return assert_matches_reference(ref, fused, x, dy)


def check_as_given(ref, fused, x, dy, param_rtol):
    """Like assert_matches_reference, but x reaches the module with its own strides
    (the helper clones x densely) and parameter gradients get ``param_rtol``."""
    xg = x.detach().requires_grad_()
    out = fused(xg)
    out.backward(dy)
    ref_out, ref_dx, ref_grads = reference_outputs(ref, x, dy)
    tol = TOLERANCES[x.dtype]
    torch.testing.assert_close(out.double(), ref_out, **tol, msg=lambda m: f"forward: {m}")
    torch.testing.assert_close(xg.grad.double(), ref_dx, **tol, msg=lambda m: f"dx: {m}")
    grads = {n: p.grad for n, p in fused.named_parameters()}
    for name in PARAM_NAMES:
        assert grads[name].dtype == fused.get_parameter(name).dtype
        assert_rel_close(grads[name], ref_grads[name], param_rtol, name)


# ---------------------------------------------------------------------------------------------
# Kernel paths


@pytest.mark.parametrize("shape,G", [((2, 8, 7, 5), 2), ((1, 12, 13, 11), 3)], ids=str)
def test_single_sweep(tdevice, launches, shape, G):
    check(shape, G, torch.float32, tdevice)
    for plan in launches.both():
        assert not plan.chunked and plan.block_j == 1 and plan.block_hw >= shape[2] * shape[3]


@pytest.mark.parametrize("shape,G", [((2, 24, 7, 7), 3), ((2, 32, 8, 8), 4), ((1, 16, 14, 14), 2)],
                         ids=str)
def test_packs_small_planes(tdevice, launches, limits, shape, G):
    limits(min_programs=1)
    check(shape, G, torch.float32, tdevice)
    for plan in launches.both():
        assert not plan.chunked and plan.block_j > 1


@pytest.mark.parametrize("dtype,memory_format", [(torch.float32, NCHW), (torch.float64, NCHW),
                                                 (torch.float16, CL), (torch.bfloat16, NCHW)],
                         ids=str)
def test_chunked_two_sweeps(tdevice, launches, limits, dtype, memory_format):
    limits(on_chip_values=64)
    shape = (2, 16, 7, 5)
    check(shape, 2, dtype, tdevice, memory_format, dy_format=memory_format)
    for plan in launches.both():
        assert plan.chunked and plan.block_hw < shape[2] * shape[3]


def test_chunked_statistics_are_numerically_sound(tdevice, launches, limits):
    """A large common offset (mean 300, std 0.085): merging per-chunk sums of squares
    (E[x^2] - E[x]^2) in float32 would lose the variance entirely; Chan's merge of
    centred chunk statistics keeps it. Forward only: dx of such input is ill-conditioned
    in float32 whatever the kernel does."""
    limits(on_chip_values=64)
    ref = random_reference(8, 2, tdevice)
    params = [p.detach().reshape(-1) for p in (ref.cweight, ref.cbias, ref.sweight, ref.sbias,
                                                ref.gn.weight, ref.gn.bias)]
    x = (random_input((2, 8, 9, 11), torch.float64, tdevice) * 0.05 + 300).float()
    out, mean, rstd = torch.ops.sa_kernels.forward(x, *params, 2, 1e-5, "triton")
    assert launches.forward.chunked
    var64, mean64 = torch.var_mean(x.double(), dim=(2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-7, atol=0)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(var64 + 1e-5), rtol=1e-4, atol=0)
    ref_out = reference_outputs(ref, x, torch.ones_like(x))[0]
    torch.testing.assert_close(out.double(), ref_out, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape,G,wide", [((2, 16, 5, 3), 2, False), ((2, 64, 3, 3), 4, True)],
                         ids=str)
def test_channels_last(tdevice, launches, limits, dtype, shape, G, wide):
    if wide:
        limits(min_programs=1)  # let the channel block grow to its widest
    out, dx, _ = check(shape, G, dtype, tdevice, CL, dy_format=CL)
    assert out.is_contiguous(memory_format=CL) and dx.is_contiguous(memory_format=CL)
    sector = 32 // torch.empty((), dtype=dtype).element_size()
    for plan in launches.both():
        assert plan.block_j >= min(sector, shape[1] // 2)
        if wide:
            assert plan.block_j == min(launch_config.LIMITS.cl_max_pairs, shape[1] // 2)


def test_channels_last_chunked(tdevice, launches, limits):
    limits(on_chip_values=64)
    check((2, 16, 6, 7), 2, torch.float32, tdevice, CL, dy_format=CL)
    assert launches.forward.chunked and launches.forward.block_j == 8


# The three ways the forward takes a plane's statistics (chunked: on_chip_values limited).
STATISTICS_PATHS = pytest.mark.parametrize("memory_format,chunked", [(NCHW, False), (NCHW, True), (CL, False)],
                                           ids=["single-sweep", "chunked", "channels-last"])


@STATISTICS_PATHS
def test_an_infinity_makes_its_spatial_plane_nan_as_groupnorm_does(tdevice, launches, limits, memory_format,
                                                                    chunked):
    if chunked:
        limits(on_chip_values=16)
    B, C, H, W, G = 2, 16, 5, 6, 2
    ref = random_reference(C, G, device=tdevice)
    x = random_input((B, C, H, W), torch.float32, tdevice, memory_format)
    x[0, 5, 1, 2] = float("inf")     # index 5 of a group of 8: spatial branch
    x[1, 12, 0, 0] = float("-inf")   # channel 12: index 4, spatial, at the plane's first value
    with torch.no_grad():
        out = FusedShuffleAttention.from_module(ref, backend="triton")(x)
        expected = sa_kernels.ShuffleAttention(C, G=G).to(tdevice, torch.float64)
        expected.load_state_dict(ref.state_dict())
        expected = expected(x.to(torch.float64))
    assert launches.forward.chunked == chunked
    assert int(torch.isnan(expected).sum()) == 2 * H * W
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    torch.testing.assert_close(out.to(torch.float64), expected, equal_nan=True, **TOLERANCES[torch.float32])


@STATISTICS_PATHS
def test_a_plane_whose_first_value_is_an_outlier_keeps_exact_statistics(tdevice, launches, limits, memory_format,
                                                                         chunked):
    # One-pass sums about each plane's first value lost such a plane's variance to cancellation
    # in the cpu kernels; the Triton kernels' per-chunk statistics and Chan merges must keep it.
    if chunked:
        limits(on_chip_values=64)
    ref, fused = _modules(16, 2, tdevice, torch.float32)
    x = random_input((2, 16, 24, 20), torch.float32, tdevice, memory_format)
    x[:, :, 0, 0] = 1e3
    assert_matches_reference(ref, fused, x)
    assert launches.forward.chunked == chunked


@pytest.mark.parametrize("view", ["sliced", "transposed", "channel_step"])
def test_generic_strides(tdevice, launches, view):
    """Non-dense x is addressed through its strides; out and dx come from empty_like(x)."""
    ref, fused = _modules(16, 2, tdevice, torch.float32)
    if view == "sliced":
        x = random_input((2, 16, 9, 11), torch.float32, tdevice)[:, :, ::2, 1::2]
    elif view == "transposed":
        x = random_input((2, 16, 5, 7), torch.float32, tdevice).transpose(2, 3)
    else:
        x = random_input((2, 32, 4, 5), torch.float32, tdevice)[:, ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=CL)
    check_as_given(ref, fused, x, random_input(x.shape, x.dtype, tdevice), PARAM_GRAD_RTOL[x.dtype])
    if view != "channel_step":
        assert False in launches.flat, "the per-element (h, w) addressing did not run"


def test_expanded_grad_out(tdevice, launches):
    """.sum().backward() hands the backward an all-zero-stride grad_out."""
    shape = (2, 8, 5, 6)
    dy = torch.ones((), device=tdevice).expand(shape)
    ref, fused = _modules(8, 2, tdevice, torch.float32)
    assert_matches_reference(ref, fused, random_input(shape, torch.float32, tdevice), dy)
    assert launches.grad_out_strides == [(0, 0, 0, 0)]


def test_int64_offsets(tdevice, launches, limits, monkeypatch):
    """The int64 offset variant (chosen when channels or a plane span 2**31 elements, too
    large to allocate here) computes the same results on small shapes."""
    monkeypatch.setattr(triton_kernels, "_needs_int64", lambda *tensors: True)
    check((2, 8, 5, 3), 2, torch.float32, tdevice)
    limits(on_chip_values=16)
    check((2, 8, 5, 3), 2, torch.float32, tdevice, CL)
    assert launches.forward.chunked


# ---------------------------------------------------------------------------------------------
# dtypes and shapes


@pytest.mark.parametrize("dtype,param_dtype", [
    (torch.float32, torch.float32), (torch.float64, torch.float64),
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32),  # AMP: float32 params
    (torch.float32, torch.float64),
], ids=str)
def test_dtypes(tdevice, dtype, param_dtype):
    check((2, 8, 6, 5), 2, dtype, tdevice, param_dtype=param_dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_params(tdevice, dtype):
    """Params in x's half dtype are read as float32; their gradients come back in that
    dtype, so they are compared at its rounding (2 units of the last place)."""
    ref, fused = _modules(8, 2, tdevice, dtype)
    x = random_input((2, 8, 6, 5), dtype, tdevice)
    check_as_given(ref, fused, x, random_input(x.shape, dtype, tdevice),
                   param_rtol=2 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("shape,G", [
    ((2, 4, 1, 1), 1),     # 1x1 planes (the reference's GroupNorm needs B * G > 1 there)
    ((2, 2, 7, 5), 1),     # G = 1 and a single channel pair: half = C/2 = 1
    ((1, 64, 3, 2), 32),   # large G (half = 1), batch 1
    ((1, 6, 13, 11), 1),   # primes, batch 1
    ((3, 10, 1, 7), 5),    # H = 1, odd half
    ((2, 12, 5, 1), 2),    # W = 1
], ids=str)
def test_odd_shapes(tdevice, shape, G):
    check(shape, G, torch.float32, tdevice)


def test_odd_shapes_float64_chunked(tdevice, launches, limits):
    limits(on_chip_values=128)
    check((1, 6, 13, 11), 1, torch.float64, tdevice)
    assert launches.forward.chunked and launches.backward.chunked


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("chunked", [False, True])
def test_statistics_match_torch_backend(tdevice, launches, limits, dtype, chunked):
    """The saved (B, C) mean/rstd are the shared format every backend's backward reads.
    Constant planes (variance 0) make rstd = 1 / sqrt(eps): eps must reach the kernel
    at full float64 precision, not as a float32 scalar."""
    if chunked:
        limits(on_chip_values=16)
    ref = random_reference(8, 2, tdevice, dtype)
    params = [p.detach().reshape(-1) for p in (ref.cweight, ref.cbias, ref.sweight, ref.sbias,
                                                ref.gn.weight, ref.gn.bias)]
    x = random_input((2, 8, 5, 6), dtype, tdevice)
    x[0, 1] = 0.7
    x[1, 6] = -2.0
    _, mean, rstd = torch.ops.sa_kernels.forward(x, *params, 2, 1e-5, "triton")
    _, mean_t, rstd_t = torch.ops.sa_kernels.forward(x, *params, 2, 1e-5, "torch")
    assert launches.forward.chunked == chunked
    tol = dict(rtol=1e-13, atol=0) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(mean, mean_t, **tol)
    torch.testing.assert_close(rstd, rstd_t, **tol)


def test_empty_input(tdevice):
    ref, fused = _modules(8, 2, tdevice, torch.float32)
    x = torch.empty((0, 8, 4, 4), device=tdevice, requires_grad=True)
    out = fused(x)
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape
    assert all(torch.count_nonzero(p.grad) == 0 for p in fused.parameters())


# ---------------------------------------------------------------------------------------------
# Determinism and integration with torch


@pytest.mark.parametrize("chunked", [False, True])
def test_bitwise_deterministic(tdevice, launches, limits, chunked):
    limits(min_programs=1, reduce_rows=2, reduce_single_rows=0,
           **({"on_chip_values": 128} if chunked else {}))
    ref, fused = _modules(24, 3, tdevice, torch.float32)
    x = random_input((2, 24, 6, 5), torch.float32, tdevice)
    dy = random_input(x.shape, x.dtype, tdevice)
    first = fused_outputs(fused, x, dy)
    second = fused_outputs(fused, x, dy)
    assert launches.forward.chunked == chunked
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name in PARAM_NAMES:
        assert torch.equal(first[2][name], second[2][name]), name


def _op_args(device, dtype=torch.float32):
    ref = random_reference(16, 2, device, dtype)
    x = random_input((2, 16, 5, 4), dtype, device, CL)
    params = [p.detach().reshape(-1) for p in (ref.cweight, ref.cbias, ref.sweight, ref.sbias,
                                                ref.gn.weight, ref.gn.bias)]
    return x, params


def test_opcheck(tdevice):
    x, params = _op_args(tdevice)
    fwd_args = (x.requires_grad_(), *[p.requires_grad_() for p in params], 2, 1e-5, "triton")
    torch.library.opcheck(torch.ops.sa_kernels.forward.default, fwd_args)
    out, mean, rstd = torch.ops.sa_kernels.forward(x.detach(), *[p.detach() for p in params],
                                                   2, 1e-5, "triton")
    dy = random_input(x.shape, x.dtype, tdevice)
    bwd_args = (dy, x.detach(), *[p.detach() for p in params], mean, rstd, 2, 1e-5, "triton")
    torch.library.opcheck(torch.ops.sa_kernels.backward.default, bwd_args)


def test_torch_compile_fullgraph(tdevice):
    torch._dynamo.reset()
    ref, fused = _modules(16, 2, tdevice, torch.float32)
    compiled = FusedShuffleAttention.from_module(ref, backend="triton")
    compiled.compile(fullgraph=True)  # in place: parameter names stay those of the reference
    x = random_input((2, 16, 5, 4), torch.float32, tdevice)
    dy = random_input(x.shape, x.dtype, tdevice)
    out_c, dx_c, grads_c = fused_outputs(compiled, x, dy)
    out_e, dx_e, grads_e = fused_outputs(fused, x, dy)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    torch.testing.assert_close(dx_c, dx_e, rtol=0, atol=0)
    for name in PARAM_NAMES:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=0, atol=0)
    assert_matches_reference(ref, compiled, x, dy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_capture_and_replay():
    device = torch.device("cuda")
    if sa_kernels.backends.unavailable_reason("triton", device) is not None:
        pytest.skip("triton backend unavailable on CUDA")
    ref, fused = _modules(32, 4, device, torch.float32)
    static_x = random_input((4, 32, 7, 7), torch.float32, device).requires_grad_()
    static_dy = random_input(static_x.shape, torch.float32, device)
    inputs = [static_x] + list(fused.parameters())

    def step():
        out = fused(static_x)
        return out, torch.autograd.grad(out, inputs, static_dy)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up: compile the kernels outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_grads = step()
    for _ in range(2):  # replay on new data: the graph reads the static buffers
        with torch.no_grad():
            static_x.copy_(random_input(static_x.shape, torch.float32, device))
            static_dy.copy_(random_input(static_x.shape, torch.float32, device))
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_dx, ref_grads = reference_outputs(ref, static_x.detach(), static_dy)
        torch.testing.assert_close(static_out.double(), ref_out, **TOLERANCES[torch.float32])
        torch.testing.assert_close(static_grads[0].double(), ref_dx, **TOLERANCES[torch.float32])
        for name, g in zip(PARAM_NAMES, static_grads[1:]):
            assert_rel_close(g, ref_grads[name], PARAM_GRAD_RTOL[torch.float32], name)


def test_kernels_compile_for_sm90():
    """Every kernel variant the cases launch builds to an sm_90 cubin with Triton's real
    compiler and ptxas (no GPU needed): catches what the interpreter lets through.
    With a GPU the other tests compile and run the kernels for real instead."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the kernels are compiled and run by the other tests")
    pytest.importorskip("triton.backends.nvidia.compiler")
    libtriton = pytest.importorskip("triton._C.libtriton")
    if not hasattr(libtriton, "native_specialize_impl"):
        pytest.skip("this Triton version lacks the specialisation hook the check mirrors")
    script = os.path.join(os.path.dirname(__file__), "triton_compile_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, script, "90"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "kernel variants for sm_90" in done.stdout


# ---------------------------------------------------------------------------------------------
# Availability messages and the launch heuristic (no kernel runs)


def test_unavailable_reasons(monkeypatch):
    assert "CUDA" in triton_kernels.unavailable_reason(torch.device("meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in triton_kernels.unavailable_reason(torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    assert "pip install triton" in triton_kernels.unavailable_reason(torch.device("cpu"))


def test_cpu_availability_follows_interpreter():
    reason = triton_kernels.unavailable_reason(torch.device("cpu"))
    assert (reason is None) == (os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.parametrize("case", [
    # (B, C, H, W, dtype bytes, fp64, channels_last, tensors) -> (chunked, block_j)
    ((8, 256, 56, 56, 4, False, False, 1), (False, 1)),
    ((8, 256, 56, 56, 4, False, False, 2), (False, 1)),
    ((8, 256, 56, 56, 8, True, False, 2), (True, 1)),     # float64 counts double
    ((8, 256, 112, 112, 4, False, False, 1), (True, 1)),
    ((2, 64, 256, 256, 2, False, False, 1), (True, 1)),
    ((64, 256, 8, 8, 4, False, False, 1), (False, 16)),   # small planes packed
    ((8, 512, 7, 7, 2, False, False, 1), (False, 4)),   # ... while >= 512 programs
    ((8, 256, 7, 7, 2, False, True, 1), (False, 16)),     # channels_last: >= one sector of halves
    ((8, 256, 56, 56, 4, False, True, 1), (True, 8)),     # channels_last: split, 4 slices
    ((64, 256, 56, 56, 4, False, True, 1), (True, 16)),   # channels_last: two sweeps
], ids=str)
def test_launch_heuristic(monkeypatch, case):
    monkeypatch.setattr(launch_config, "TUNED", {})  # the rules themselves
    (B, C, H, W, size, fp64, cl, tensors), (chunked, block_j) = case
    plan = launch_config.plan_planes(B, C // 2, H * W, size, fp64, cl, tensors=tensors)
    assert (plan.chunked, plan.block_j) == (chunked, block_j)
    values = 2 * plan.block_j * plan.block_hw * tensors * (2 if fp64 else 1)
    assert values <= launch_config.LIMITS.on_chip_values
    assert plan.grid == (B * -(-(C // 2) // plan.block_j) * plan.splits,)
    assert 1 <= plan.num_warps <= 16
    if not chunked:
        assert plan.block_hw >= H * W


def test_launch_overrides_and_settings():
    """``override`` forces plan fields and limits inside its block only, and changes the
    settings token that launch caches are keyed on; TUNED entries apply to their case."""
    args = (8, 128, 56 * 56, 4, False, False, 1)
    default = launch_config.plan_planes(*args)
    before = launch_config.settings()
    with launch_config.override(block_j=2, num_warps=4):
        forced = launch_config.plan_planes(*args)
        assert (forced.block_j, forced.num_warps) == (2, 4)
        assert forced.grid == (8 * 64,) and launch_config.settings() != before
    with launch_config.override(limits={"on_chip_values": 1024}):
        assert launch_config.plan_planes(*args).chunked and launch_config.LIMITS.on_chip_values == 1024
    with launch_config.override(chunked=True, block_hw=512):
        assert launch_config.plan_planes(*args)[:3] == (default.block_j, 512, True)
    assert launch_config.plan_planes(*args) == default and launch_config.settings() == before
    with pytest.raises(ValueError, match="block_j"):
        with launch_config.override(block_j=3):
            launch_config.plan_planes(*args)
    with pytest.raises(ValueError, match="unknown plan fields"):
        with launch_config.override(blockj=2):
            pass
    key = launch_config.tune_key(*args)
    try:
        launch_config.TUNED[key] = {"num_warps": 2}
        assert launch_config.plan_planes(*args).num_warps == 2
        assert launch_config.plan_planes(16, *args[1:]).num_warps == default.num_warps
    finally:
        del launch_config.TUNED[key]


def test_limits_from_environment():
    assert launch_config.limits_from_env("") == launch_config.Limits()
    lim = launch_config.limits_from_env("on_chip_values=8192, values_per_warp=128")
    assert (lim.on_chip_values, lim.values_per_warp) == (8192, 128)
    with pytest.raises(ValueError, match="SA_KERNELS_TRITON_LIMITS"):
        launch_config.limits_from_env("on_chip=1")


class _FakeCompiled:
    """Stands in for Triton's CompiledKernel: records direct launches."""
    function = packed_metadata = "handle"

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(((grid[0], grid[1], grid[2]), args))


class _FakeJit:
    """Stands in for a JITFunction: records JIT launches, returns what Triton would."""
    arg_names = ["a_ptr", "b_ptr", "n", "eps", "BLOCK", "FLAG"]

    def __init__(self, returns):
        self.returns, self.calls = returns, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return self.returns
        return launch


def test_kernel_launch_skips_binding_after_first_launch():
    """On a GPU, KernelLaunch launches the CompiledKernel that Triton's JIT returned for the
    tensors' alignment pattern, with every argument in signature order (constexprs too);
    a new alignment pattern goes through the JIT again. (The real CompiledKernel needs a
    GPU: this checks the bookkeeping with stand-ins.)"""
    from sa_kernels.triton.launcher import KernelLaunch
    compiled = _FakeCompiled()
    jit = _FakeJit(compiled)
    launch = KernelLaunch(jit, (6,), 2, (7, 0.5), {"FLAG": True, "BLOCK": 64}, 4, direct=True)
    a, b = torch.zeros(8), torch.zeros(8)
    launch(a, b)
    assert jit.calls == [((6, 1, 1), (a, b, 7, 0.5), {"num_warps": 4, "FLAG": True, "BLOCK": 64})]
    launch(a, b)
    assert len(jit.calls) == 1 and compiled.calls == [((6, 1, 1), (a, b, 7, 0.5, 64, True))]
    launch(a[1:], b)  # 4-byte offset: another specialisation, so another JIT launch
    assert len(jit.calls) == 2 and len(compiled.calls) == 1


@pytest.mark.parametrize("why", ["interpreter", "not compiled", "keywords not the tail",
                                 "switched off"])
def test_kernel_launch_falls_back_to_jit(monkeypatch, why):
    from sa_kernels.triton import launcher
    if why == "switched off":  # SA_KERNELS_TRITON_DIRECT_LAUNCH=0
        monkeypatch.setattr(launcher, "DIRECT", False)
    jit = _FakeJit(None if why == "not compiled" else _FakeCompiled())
    constexprs = {"BLOCK": 64} if why == "keywords not the tail" else {"FLAG": True, "BLOCK": 64}
    launch = launcher.KernelLaunch(jit, (6,), 2, (7, 0.5), constexprs, 4,
                                   direct=why != "interpreter")
    a, b = torch.zeros(8), torch.zeros(8)
    for _ in range(3):
        launch(a, b)
    assert len(jit.calls) == 3 and not launch.direct


def test_launches_cached_per_key(tdevice, launches, limits):
    """Planning runs once per (shape, strides, dtypes, device, groups, eps, settings); a call
    with a cached key launches the same kernels with the same arguments."""
    x, params = _op_args(tdevice)  # channels_last
    run = lambda x, eps=1e-5: torch.ops.sa_kernels.forward(x, *params, 2, eps, "triton")  # noqa: E731
    first = run(x)
    again = run(x.clone(memory_format=CL))
    assert len(launches.plans[1]) == 1
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    run(x.contiguous())               # other strides
    run(x.double())                   # other dtype
    run(x, eps=1e-3)                  # other eps
    limits(on_chip_values=64)         # other limits
    run(x)
    assert len(launches.plans[1]) == 5
    dy = random_input(x.shape, x.dtype, tdevice, CL)
    for grad_out in (dy, dy, dy.contiguous()):
        torch.ops.sa_kernels.backward(grad_out, x, *params, *first[1:], 2, 1e-5, "triton")
    assert len(launches.plans[2]) == 2


@pytest.mark.parametrize("shape,G,reduce_rows", [((3, 20, 3, 4), 5, 4), ((4, 16, 2, 3), 4, 2)],
                         ids=str)
def test_parameter_gradients_two_stage(tdevice, limits, shape, G, reduce_rows):
    """Many (batch, group) rows (4096 at G = 64, batch 64) are summed by a first launch in
    parallel chunks, then in order by a second; the rows here do not divide evenly."""
    limits(reduce_rows=reduce_rows, reduce_single_rows=0)
    plan = launch_config.plan_param_grads(shape[0] * G, shape[1] // (2 * G))
    assert plan.grid[1] > 1 and plan.final is not None and plan.final.grid[1] == 1
    check(shape, G, torch.float32, tdevice)
    check(shape, G, torch.float64, tdevice, CL)


def test_parameter_gradient_plans():
    """Stage-4 and stage-1 shapes (G = 64, batch 64): the first stage spreads the rows over
    several programs; every row is covered exactly once. The seed's 512 rows: one stage."""
    assert launch_config.plan_param_grads(512, 16).final is None
    for rows, half in ((4096, 16), (4096, 2), (2048, 16), (1025, 1), (100, 1), (1, 1)):
        plan = launch_config.plan_param_grads(rows, half)
        chunks = plan.grid[1]
        assert plan.rows_per_chunk % plan.block_r == 0
        assert (chunks - 1) * plan.rows_per_chunk < rows <= chunks * plan.rows_per_chunk
        assert (plan.final is None) == (chunks == 1)
        if rows == 4096:
            assert chunks >= 16
        if plan.final is not None:
            assert plan.final.grid == (plan.grid[0], 1) and plan.final.rows_per_chunk >= chunks


# ---------------------------------------------------------------------------------------------
# Split planes: channels_last with too few (sample, channel block) programs to fill the GPU

SPLIT = dict(split_below=10 ** 6, min_split_positions=4)  # split even tiny planes


@pytest.mark.parametrize("dtype,dy_format", [(torch.float32, CL), (torch.float16, NCHW),
                                             (torch.float64, CL), (torch.bfloat16, CL)], ids=str)
def test_split_planes(tdevice, launches, limits, dtype, dy_format):
    limits(**SPLIT)
    check((2, 16, 5, 7), 2, dtype, tdevice, CL, dy_format=dy_format)
    for plan in launches.both():
        assert plan.splits > 1 and plan.waves == 1
        assert plan.grid == (2 * plan.num_jblocks * plan.splits,)
        assert (plan.splits - 1) * plan.slice_len < 35 <= plan.splits * plan.slice_len


@pytest.mark.parametrize("fields", [dict(splits=4, block_hw=2), dict(splits=2, waves=2),
                                    dict(splits=8, block_hw=4, waves=3)], ids=str)
def test_split_planes_forced(tdevice, launches, fields):
    """Slices of several chunks, a short last slice, and waves (launch pairs over
    consecutive sample groups); results bitwise identical run to run."""
    with launch_config.override(**fields):
        ref, fused = _modules(16, 2, tdevice, torch.float32)
        x = random_input((3, 16, 5, 7), torch.float32, tdevice, CL)
        dy = random_input(x.shape, x.dtype, tdevice, CL)
        first = assert_matches_reference(ref, fused, x, dy)
        second = fused_outputs(fused, x, dy)
    for plan in launches.both():
        assert plan.splits > 1 and plan.waves == fields.get("waves", 1)
        assert plan.block_hw == fields.get("block_hw", plan.block_hw)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name in PARAM_NAMES:
        assert torch.equal(first[2][name], second[2][name]), name


def test_split_statistics_are_numerically_sound(tdevice, launches, limits):
    """Per-slice (mean, M2) merged with Chan's formula keep a variance 1e-4 of the
    squared mean (see test_chunked_statistics_are_numerically_sound)."""
    limits(**SPLIT)
    ref = random_reference(8, 2, tdevice)
    params = [p.detach().reshape(-1) for p in (ref.cweight, ref.cbias, ref.sweight, ref.sbias,
                                                ref.gn.weight, ref.gn.bias)]
    x = (random_input((2, 8, 9, 11), torch.float64, tdevice, CL) * 0.05 + 300).float()
    out, mean, rstd = torch.ops.sa_kernels.forward(x, *params, 2, 1e-5, "triton")
    assert launches.forward.splits > 1
    var64, mean64 = torch.var_mean(x.double(), dim=(2, 3), correction=0)
    # two or three float32 ulps (1.2e-7 each) for a mean merged over slices and chunks
    torch.testing.assert_close(mean.double(), mean64, rtol=3.6e-7, atol=0)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(var64 + 1e-5), rtol=1e-4, atol=0)
    ref_out = reference_outputs(ref, x, torch.ones_like(x))[0]
    torch.testing.assert_close(out.double(), ref_out, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("case,splits", [
    # (B, C, H, W, dtype bytes, tensors) -> splits: too few programs for the chip
    ((8, 64, 256, 256, 4, 1), 16), ((8, 64, 256, 256, 2, 2), 32), ((1, 64, 256, 256, 4, 1), 128),
    ((16, 256, 80, 80, 4, 1), 1),   # 256 programs: left whole
    ((64, 256, 56, 56, 2, 1), 1),
], ids=str)
def test_split_heuristic(monkeypatch, case, splits):
    monkeypatch.setattr(launch_config, "TUNED", {})  # the rules themselves
    B, C, H, W, size, tensors = case
    plan = launch_config.plan_planes(B, C // 2, H * W, size, False, True, tensors=tensors)
    assert plan.splits == splits
    if splits > 1:
        assert plan.grid[0] >= launch_config.LIMITS.min_programs
        assert plan.slice_len % plan.block_hw == 0 and plan.slice_len >= 256
    with launch_config.override(limits={"wave_bytes": 16 << 20}):
        waved = launch_config.plan_planes(B, C // 2, H * W, size, False, True, tensors=tensors)
    if splits > 1:
        assert waved.waves == -(-B * C * H * W * size * tensors // (16 << 20))


# ---------------------------------------------------------------------------------------------
# benchmarks/triton_sweep.py: its plan and its TUNED output (the timing itself needs a GPU)


def _sweep_module():
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "triton_sweep.py")
    spec = importlib.util.spec_from_file_location("triton_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_plan(capsys):
    sweep = _sweep_module()
    plan = sweep.main(["--dry-run"])
    assert "variants in" in capsys.readouterr().out
    assert len(plan) == 2 * len(sweep.CASES) and sum(len(vs) for *_, vs in plan) < 400
    for cid, case, mode, vs in plan:
        names = [name for name, _, _ in vs]
        assert names[0] == "default" and len(set(names)) == len(names) > 1, cid
        base = sweep._plan(sweep.plan_args(*case, mode), {})
        plans = [sweep._plan(sweep.plan_args(*case, mode), f, lim or None) for _, f, lim in vs]
        assert plans[0] == base
        if base.splits > 1:  # the split path is timed against the unsplit one
            assert any(p.splits == 1 for p in plans), cid
    assert [c for c, *_ in sweep.main(["--dry-run", "--cases", "seed-float32"])] == \
        ["seed-float32-nchw"] * 2


def test_sweep_tuned_entries_paste_into_launch_config():
    sweep = _sweep_module()
    args = sweep.plan_args(sweep._BY_NAME["seed"], "float32", False, "forward")
    results = [{"case": "seed-float32-nchw", "mode": "forward", "plan_args": list(args),
                "variants": [{"name": "default", "fields": {}, "device_us": 10.0},
                             {"name": "block_j=8", "fields": {"block_j": 8}, "device_us": 8.0},
                             {"name": "x", "fields": {"num_warps": 2}, "device_us": 9.9}]},
               {"case": "same", "mode": "forward", "plan_args": list(args),
                "variants": [{"name": "default", "fields": {}, "device_us": 10.0},
                             {"name": "x", "fields": {"num_warps": 2}, "device_us": 9.9}]}]
    lines = sweep.tuned_entries(results, min_gain=0.05)
    assert len(lines) == 1  # the second case's best gained 1%: no entry
    table = eval("{\n" + "\n".join(lines) + "\n}")
    assert table == {launch_config.tune_key(*args): {"block_j": 8}}
    saved = dict(launch_config.TUNED)
    try:
        launch_config.TUNED.update(table)
        assert launch_config.plan_planes(*args).block_j == 8
    finally:
        launch_config.TUNED.clear()
        launch_config.TUNED.update(saved)


def test_sweep_runs_every_variant(tdevice):
    """The sweep's per-variant calls (forced plans and limits, forward and backward) on an
    interpreter-sized case: every variant kind of a split case runs and agrees with the
    heuristic's plan to rounding (the sweep's own check on the GPU)."""
    if tdevice.type != "cpu":
        pytest.skip("the GPU sweep itself covers this")
    sweep = _sweep_module()
    tiny = sweep.Shape("tiny", 2, 16, 16, 32, 2)
    with launch_config.override(limits={"split_below": 10 ** 6, "min_split_positions": 64,
                                        "reduce_rows": 2, "reduce_single_rows": 0}):
        plan = [(sweep.case_id(tiny, "float32", True), (tiny, "float32", True), mode,
                 sweep.variants(tiny, "float32", True, mode)) for mode in sweep.MODES]
        kinds = {k for *_, vs in plan for _, fields, limits in vs for k in {**fields, **limits}}
        assert {"splits", "waves", "block_hw", "num_warps", "reduce_rows"} <= kinds
        sets, params, _ = sweep._inputs(tiny, "float32", True, "cpu", count=1)
        for *_, mode, vs in plan:
            checks = sweep.check_variants(mode, sets[0], params, tiny.groups, vs)
            assert len(checks) == len(vs) and max(checks.values()) < 1e-5, checks


# ---------------------------------------------------------------------------------------------
# VEC: strides passed divided by the vector width, so the compiler can emit vector accesses


def test_vec_hint_choice():
    vec = triton_kernels._vec
    t = lambda shape, dtype=torch.float32, fmt=NCHW: torch.empty(shape, dtype=dtype, memory_format=fmt)  # noqa: E731
    assert vec(16, 196, 4, t((2, 8, 14, 14))) == 4                    # 196 = 4 * 49
    assert vec(16, 196, 2, t((2, 8, 14, 14), torch.bfloat16)) == 4    # 8 would not divide 196
    assert vec(16, 64, 2, t((2, 8, 8, 8), torch.bfloat16)) == 8       # 16 bytes at most
    assert vec(2, 196, 4, t((2, 8, 14, 14))) == 2                     # the plan's cap
    assert vec(16, 49, 4, t((2, 8, 7, 7))) == 1
    assert vec(16, 196, 4, t((2, 8, 14, 14), fmt=CL)) == 1            # channels are contiguous
    assert vec(16, 196, 4, t((2, 8, 14, 28))[..., ::2]) == 1          # not a unit-step run
    assert vec(16, 196, 4, t((2, 8, 14, 14)), torch.ones(()).expand(2, 8, 14, 14)) == 1
    assert vec(16, 196, 4, t((2, 9, 14, 14))[:, 1:]) == 4             # offset views keep strides


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vec_hint_paths(tdevice, launches, dtype):
    """H*W = 12 (a multiple of 4, not of 16): forward and backward run with VEC = 4."""
    check((2, 8, 2, 6), 2, dtype, tdevice)
    fwd = [launch for plan in triton_kernels._forward_launches.values()
           for launch, _ in plan.launches.launches]
    bwd = [launch for plan in triton_kernels._backward_launches.values()
           for launch, _ in plan.launches.launches]
    assert [launch.constexprs["VEC"] for launch in fwd] == [4]
    assert bwd[0].constexprs["VEC"] == 4
    with launch_config.override(vec=1):
        check((2, 8, 2, 6), 2, dtype, tdevice)


def test_sweep_splits_profile_at_markers():
    sweep = _sweep_module()
    names = ["FillFunctor", "copy", "FillFunctor", "fwd", "fwd", "FillFunctor", "FillFunctor"]
    events = [type("Event", (), {"name": n})() for n in names]
    parts = sweep.split_at_markers(events, 3)
    assert [[e.name for e in part] for part in parts] == [["copy"], ["fwd", "fwd"], []]
    assert sweep.split_at_markers(events, 2) is None
    assert sweep.split_at_markers(events[1:2], 1) is None
