"""The native ops (C++ schemas, autograd and CPU kernels): what the shared backend tests do not cover.

tests/test_shuffle_attention.py, test_ops.py and test_export.py run every backend, the
``cpu`` backend included: forward and all gradients against the float64 reference on odd
shapes, dtypes and layouts, gradcheck, opcheck of the Python ops, compile and export.
Here: the extension is built and loaded for this CPU, the native ops themselves under
opcheck, autograd in C++ (one op per call), thread-count determinism, every vector path
of the CPU kernels, and each bad input's error.
"""
import os
import subprocess
import sys

import pytest
import torch

import sa_kernels
from sa_kernels import _native
from helpers import (TOLERANCES, assert_matches_reference, fused_outputs, random_input, random_reference,
                     reference_outputs)

FWD = torch.ops.sa_kernels.shuffle_attention.default
BWD = torch.ops.sa_kernels.shuffle_attention_backward.default
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def native_args(B=2, C=32, H=5, W=7, G=4, dtype=torch.float32, fmt=torch.contiguous_format):
    ref = random_reference(C, G, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    params = [p.detach().clone() for p in ref.parameters()]
    return random_input((B, C, H, W), dtype, "cpu", fmt), params, G


def test_the_extension_is_built_for_this_cpu():
    # The README's set-up builds it wherever a compiler is present (CI included): without
    # it every cpu-backend test below would be skipped, so its absence is a failure here.
    assert _native.ops_loaded(), _native.unavailable_reason_ops()
    assert _native.cpu_capability() is not None, _native.unavailable_reason_cpu()
    torch_capability = torch.backends.cpu.get_cpu_capability().lower()
    if torch_capability in ("avx512", "avx2", "default"):
        assert _native.cpu_capability() == torch_capability
    assert sa_kernels.backends.resolve_name("auto", "cpu") == "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_opcheck_native_ops(dtype, fmt):
    x, params, G = native_args(dtype=dtype, fmt=fmt)
    args = (x.requires_grad_(), *[p.requires_grad_() for p in params], G, 1e-5)
    torch.library.opcheck(FWD, args)
    out, mean, rstd = FWD(x.detach(), *[p.detach() for p in params], G, 1e-5)
    dy = random_input(out.shape, dtype, "cpu", fmt)
    torch.library.opcheck(BWD, (dy, x.detach(), *[p.detach() for p in params], mean, rstd, G, 1e-5))


def test_autograd_is_one_cpp_node():
    fused = sa_kernels.FusedShuffleAttention.from_module(random_reference(16, 2), backend="cpu")
    x = random_input((2, 16, 3, 3), torch.float32, "cpu").requires_grad_()
    out = fused(x)
    assert "CppNode" in out.grad_fn.name() and "ShuffleAttentionFunction" in out.grad_fn.name()
    # Straight into the leaves: x and the six parameters, nothing in between.
    assert [type(f).__name__ for f, _ in out.grad_fn.next_functions] == ["AccumulateGrad"] * 7


def test_only_the_inputs_that_need_grad_get_one():
    fused = sa_kernels.FusedShuffleAttention.from_module(random_reference(16, 2), backend="cpu")
    fused.cweight.requires_grad_(False)
    x = random_input((2, 16, 3, 3), torch.float32, "cpu")  # no grad
    fused(x).sum().backward()
    assert fused.cweight.grad is None and fused.sbias.grad is not None


def test_double_backward_is_refused():
    x, params, G = native_args()
    x.requires_grad_()
    out = sa_kernels.shuffle_attention(x, *params, G, backend="cpu")
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative|not implemented|autograd"):
        torch.autograd.grad(gx.sum(), x)


def test_a_native_forward_is_differentiated_by_another_backend():
    x, params, G = native_args(dtype=torch.float64)
    params = [p.reshape(-1) for p in params]  # the Python ops take them flat
    out, mean, rstd = FWD(x, *params, G, 1e-5)
    _, mean_t, rstd_t = torch.ops.sa_kernels.forward(x, *params, G, 1e-5, "torch")
    torch.testing.assert_close(mean, mean_t)
    torch.testing.assert_close(rstd, rstd_t)
    dy = random_input(x.shape, torch.float64, "cpu")
    native = BWD(dy, x, *params, mean, rstd, G, 1e-5)
    python = torch.ops.sa_kernels.backward(dy, x, *params, mean, rstd, G, 1e-5, "torch")
    for a, b in zip(native, python):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


# Shapes that reach every vector path: planes longer than the 4-vector unrolled loop with a
# tail, channels_last images of several pair vectors with a partial last one, an odd number of
# positions (the statistics' even/odd chains), pair counts below one vector, single-row and
# single-column planes.
PATH_SHAPES = [
    (1, 8, 61, 67, 2),     # NCHW planes of 4087 elements: unrolled loop plus a tail
    (2, 160, 6, 5, 4),     # channels_last: C/2 = 80 pairs, several whole vectors
    (3, 520, 3, 3, 13),    # channels_last: C/2 = 260, many vectors, a partial last one; 9 positions
    (2, 12, 9, 1, 3),      # C/2 = 6 pairs, less than one vector; W = 1
    (2, 12, 1, 9, 3),      # H = 1
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("B,C,H,W,G", PATH_SHAPES, ids=str)
def test_every_vector_path_matches_the_reference(B, C, H, W, G, fmt, dtype):
    ref = random_reference(C, G, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    x = random_input((B, C, H, W), dtype, "cpu", fmt)
    assert_matches_reference(ref, sa_kernels.FusedShuffleAttention.from_module(ref, backend="cpu"), x)


# channels_last vectors mix the two branches when half < the vector width: their spatial lanes
# are packed into one vector per pair of halves where they fit (G even: the halves share a
# lane pattern; G odd: complementary patterns), and take a sigmoid each where they do not.
PACKED_LANE_SHAPES = [
    (2, 256, 3, 5, 64),    # SA-ResNet stage 1's G = 64, half = 2: every vector mixed, packed
    (1, 512, 2, 3, 64),    # half = 4
    (1, 1024, 3, 2, 64),   # half = 8
    (2, 2048, 2, 2, 64),   # half = 16: whole vectors of one branch
    (2, 6, 4, 3, 3),       # half = 1, G odd, three pairs: one partial vector
    (2, 96, 3, 3, 16),     # half = 3: some vector pairs fit one vector, some do not
    (2, 130, 3, 4, 13),    # half = 5, G odd: complementary halves, a partial last vector
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("B,C,H,W,G", PACKED_LANE_SHAPES, ids=str)
def test_channels_last_mixed_branch_vectors_match_the_reference(B, C, H, W, G, dtype):
    ref = random_reference(C, G, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    x = random_input((B, C, H, W), dtype, "cpu", torch.channels_last)
    assert_matches_reference(ref, sa_kernels.FusedShuffleAttention.from_module(ref, backend="cpu"), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_gates_far_into_both_tails_of_the_sigmoid(fmt, dtype):
    # Gate logits shifted by biases from -300 to +300: exp(-z) overflows (to inf, or to the
    # largest float that a fast exp clamps to) below z = -88, where the float sigmoid's
    # reciprocal must give 0 and never a NaN, and underflows to 0 above z = 88. Biases, not
    # weights: a large weight would make the gate ill-conditioned in x (any float32 rounding
    # of the plane's statistics magnified past the tolerance), a large bias does not.
    C, G = 64, 4
    ref = random_reference(C, G, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    with torch.no_grad():
        for name in ("cbias", "sbias"):
            getattr(ref, name).copy_(torch.linspace(-300, 300, getattr(ref, name).numel()).reshape_as(getattr(ref, name)))
    x = random_input((2, C, 5, 6), dtype, "cpu", fmt)
    fused = sa_kernels.FusedShuffleAttention.from_module(ref, backend="cpu")
    with torch.no_grad():
        out = fused(x)
    assert not torch.isnan(out).any()
    expected, expected_dx, _ = reference_outputs(ref, x, dy := random_input(x.shape, dtype, "cpu"))
    torch.testing.assert_close(out.to(torch.float64), expected, **TOLERANCES[dtype])
    # Nearly every gate saturated: the parameter gradients are rounding noise of s (1 - s) in any
    # float precision, so only dx is compared; all of them must be finite.
    got, dx, grads = fused_outputs(fused, x, dy)
    torch.testing.assert_close(dx.to(torch.float64), expected_dx, **TOLERANCES[dtype])
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_channels_last_backward_on_planes_too_large_to_keep_the_gates(dtype):
    # The channels-last backward keeps the gates of pass 1 for pass 2 up to 4 MiB per vector;
    # 257 x 257 positions x 2 halves x one vector of pairs is past that with vectors of 32
    # bytes or more (every CPU capability): recomputed.
    ref = random_reference(32, 2, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    x = random_input((1, 32, 257, 257), dtype, "cpu", torch.channels_last)
    assert_matches_reference(ref, sa_kernels.FusedShuffleAttention.from_module(ref, backend="cpu"), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_a_nan_reaches_its_whole_output_plane_and_no_other(fmt, dtype):
    # The float sigmoid's fast exp maps NaN to a number: a NaN plane (its mean and every
    # gate) must still give a NaN output plane, as the reference does.
    C, G = 64, 4  # half = 8: channel planes 0-7, spatial planes 8-15 of each group
    ref = random_reference(C, G, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    x = random_input((2, C, 5, 7), dtype, "cpu", fmt)
    x[0, 3, 2, 4] = float("nan")   # a channel-branch plane
    x[1, 9, 0, 0] = float("nan")   # a spatial-branch plane
    x[1, 40, 4, 6] = float("nan")  # a spatial-branch plane of the second half (output 2j + 1)
    with torch.no_grad():
        out = sa_kernels.FusedShuffleAttention.from_module(ref, backend="cpu")(x)
        expected = sa_kernels.ShuffleAttention(C, G=G).to(torch.float64)
        expected.load_state_dict(ref.state_dict())
        expected = expected(x.to(torch.float64))
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.isnan(expected).flatten(2).all(2).sum() == 3  # three whole planes
    torch.testing.assert_close(out.to(torch.float64), expected, equal_nan=True, **TOLERANCES[dtype])


@pytest.mark.parametrize("dy_fmt", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("x_fmt", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_mixed_layouts_of_x_and_the_upstream_gradient(x_fmt, dy_fmt):
    ref = random_reference(32, 4)
    x = random_input((2, 32, 6, 7), torch.float32, "cpu", x_fmt)
    dy = random_input(x.shape, torch.float32, "cpu", dy_fmt)
    assert_matches_reference(ref, sa_kernels.FusedShuffleAttention.from_module(ref, backend="cpu"), x, dy)


@pytest.mark.parametrize("fmt", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_bitwise_identical_across_thread_counts(fmt):
    # Enough planes (and channels_last tasks) that 4 threads split the work.
    ref = random_reference(256, 8)
    fused = sa_kernels.FusedShuffleAttention.from_module(ref, backend="cpu")
    x = random_input((4, 256, 23, 21), torch.float32, "cpu", fmt)
    dy = random_input(x.shape, torch.float32, "cpu", fmt)
    previous = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 4, 1):
            torch.set_num_threads(threads)
            xr = x.detach().requires_grad_()
            fused.zero_grad(set_to_none=True)
            out = fused(xr)
            out.backward(dy)
            runs.append([out, xr.grad] + [p.grad for p in fused.parameters()])
    finally:
        torch.set_num_threads(previous)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def _streaming_cases(dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16)):
    """Forward and all gradients on planes and channels-last rows aligned to a vector or not,
    and on transposed planes (written through a row buffer, which never streams), for each of
    dtypes; the same values for the same seed in any process."""
    torch.manual_seed(1234)
    results = []
    for dtype in dtypes:
        for shape, G in (((2, 64, 16, 16), 8), ((3, 48, 7, 9), 4)):
            for layout in ("nchw", "nhwc", "transposed"):
                ref = random_reference(shape[1], G, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
                fused = sa_kernels.FusedShuffleAttention.from_module(ref, backend="cpu")

                def make():
                    if layout == "transposed":  # dense, H and W swapped: out and dx alike
                        return random_input(shape[:2] + shape[:1:-1], dtype, "cpu").transpose(2, 3)
                    return random_input(shape, dtype, "cpu", LAYOUTS[layout])

                out, dx, grads = fused_outputs(fused, make(), make())
                results += [out, dx, *grads.values()]
    return results


def _in_a_child(tmp_path, cases, env, check):
    """cases() (a function of this file) run by a child process with env added to its
    environment, after asserting `check` (a Python expression on sa_kernels._native) there."""
    saved = tmp_path / f"{cases.__name__}-{len(list(tmp_path.iterdir()))}.pt"
    script = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import test_native; "
              f"from sa_kernels import _native; assert {check}; "
              f"torch.save(test_native.{cases.__name__}(), sys.argv[2])")
    subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__), str(saved)],
                   env=dict(os.environ, **env), check=True, timeout=300)
    return torch.load(saved)


def _assert_bitwise_equal(results, others):
    assert len(results) == len(others)
    for a, b in zip(results, others):
        assert a.dtype == b.dtype and a.stride() == b.stride()
        assert torch.equal(a, b)


@pytest.mark.parametrize("value", ["32M", "-1", "1e6"])
def test_a_cache_size_that_is_not_a_byte_count_is_ignored_with_a_warning(value):
    script = ("from sa_kernels import _native; import sys; "
              "print('size', _native.cpu_cache_bytes()); sys.stdout.flush()")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, SA_KERNELS_CPU_CACHE_BYTES=value), check=True)
    assert int(result.stdout.split("size")[1]) > 0  # the system's cache size instead
    assert f"SA_KERNELS_CPU_CACHE_BYTES={value} is not a byte count" in result.stderr


def test_outputs_streamed_past_the_cache_are_bitwise_those_stored_through_it(tmp_path):
    # Inputs and outputs larger than the last-level cache are written with non-temporal
    # stores. With the cache taken as 0 bytes every full, aligned vector streams (forward
    # out and backward dx); with 1 TiB none does.
    streamed = _in_a_child(tmp_path, _streaming_cases, {"SA_KERNELS_CPU_CACHE_BYTES": "0"},
                           "_native.cpu_cache_bytes() == 0")
    ordinary = _in_a_child(tmp_path, _streaming_cases, {"SA_KERNELS_CPU_CACHE_BYTES": str(1 << 40)},
                           f"_native.cpu_cache_bytes() == {1 << 40}")
    _assert_bitwise_equal(streamed, ordinary)


def _bfloat16_cases():
    """_streaming_cases() of bfloat16 inputs only."""
    return _streaming_cases((torch.bfloat16,))


@pytest.mark.skipif(not _native.cpu_bf16_instructions(),
                    reason="the CPU kernels convert to bfloat16 in software here (no AVX512_BF16)")
@pytest.mark.parametrize("cache_bytes", [0, 1 << 40], ids=["streamed", "stored"])
def test_bfloat16_conversions_by_instruction_are_bitwise_those_in_software(tmp_path, cache_bytes):
    # Where the CPU has AVX512_BF16 the AVX-512 kernels round float results to bfloat16 with
    # VCVTNEPS2BF16; SA_KERNELS_CPU_BF16_INSTRUCTIONS=0 takes the rounding in software. Both
    # round to nearest even: the same bits for every result that is neither NaN nor below
    # 2**-126, through ordinary stores and streamed ones alike.
    cache = {"SA_KERNELS_CPU_CACHE_BYTES": str(cache_bytes)}
    by_instruction = _in_a_child(tmp_path, _bfloat16_cases, cache, "_native.cpu_bf16_instructions()")
    in_software = _in_a_child(tmp_path, _bfloat16_cases, dict(cache, SA_KERNELS_CPU_BF16_INSTRUCTIONS="0"),
                              "not _native.cpu_bf16_instructions()")
    assert by_instruction and all(t.numel() for t in by_instruction)
    _assert_bitwise_equal(by_instruction, in_software)


def _bad(**overrides):
    """Native forward args with one replaced: x, a parameter by index, groups."""
    x, params, G = native_args()
    if "x" in overrides:
        x = overrides["x"]
    for i, p in overrides.get("params", {}).items():
        params[i] = p
    return (x, *params, overrides.get("groups", G), 1e-5)


@pytest.mark.parametrize("args,error,match", [
    (_bad(x=torch.randn(32, 5, 7)), ValueError, r"x must be 4-D \(B, C, H, W\), got a 3-D tensor of shape \(32, 5, 7\)"),
    (_bad(x=torch.randn(2, 24, 5, 7)), ValueError, r"x has 24 channels, expected 2 \* G \* half = 2 \* 4 \* 4 = 32"),
    (_bad(x=torch.randint(0, 5, (2, 32, 5, 7))), TypeError, r"floating dtype.*got torch\.int64"),
    (_bad(params={2: torch.randn(4, device="meta")}), ValueError, r"sweight is on meta, expected x's device cpu"),
    (_bad(params={5: torch.randn(3)}), ValueError, r"gn_bias has 3 elements \(shape \(3,\)\), expected half = 4"),
    (_bad(params={1: torch.randint(0, 3, (4,))}), TypeError, r"cbias must have a floating dtype, got torch\.int64"),
    (_bad(groups=0), ValueError, "groups must be a positive int, got 0"),
    # 2 * G * half wraps to 32 in int64 here: the check must not multiply blindly.
    (_bad(groups=2**62 + 4), ValueError, r"x has 32 channels, expected 2 \* G \* half = 2 \* 4611686018427387908 \* 4"),
], ids=["rank", "channels", "int-dtype", "param-device", "param-size", "param-dtype", "groups", "groups-overflow"])
def test_forward_errors_are_clear_python_exceptions(args, error, match):
    with pytest.raises(error, match=match):
        FWD(*args)
    if args[0].dim() == 4 and args[0].is_floating_point():
        with pytest.raises(error, match=match):  # the module's fast path checks the same way
            sa_kernels.shuffle_attention(*args[:7], groups=args[7], backend="cpu")


def test_backward_errors_are_clear_python_exceptions():
    x, params, G = native_args()
    out, mean, rstd = FWD(x, *params, G, 1e-5)
    dy = torch.randn_like(x)
    with pytest.raises(ValueError, match=r"grad_out has shape \(2, 32, 5, 6\), expected x's shape \(2, 32, 5, 7\)"):
        BWD(dy[..., :6], x, *params, mean, rstd, G, 1e-5)
    with pytest.raises(TypeError, match=r"grad_out has dtype torch\.float64, expected x's dtype torch\.float32"):
        BWD(dy.double(), x, *params, mean, rstd, G, 1e-5)
    with pytest.raises(ValueError, match=r"mean must be the forward's statistics of shape \(2, 32\) and dtype "
                                         r"torch\.float32, got shape \(2, 32\) and dtype torch\.float64"):
        BWD(dy, x, *params, mean.double(), rstd, G, 1e-5)
    with pytest.raises(ValueError, match=r"rstd must be the forward's statistics of shape \(2, 32\)"):
        BWD(dy, x, *params, mean, rstd[:1], G, 1e-5)


def test_the_fast_binding_refuses_what_is_not_a_tensor():
    x, params, G = native_args()
    fast = _native.fast_forward()
    with pytest.raises(TypeError, match="cbias must be a torch.Tensor, got list"):
        fast(x, params[0], [1.0] * 4, *params[2:], G, 1e-5)
    with pytest.raises(TypeError, match="takes 9 arguments, got 3"):
        fast(x, params[0], params[1])
    with pytest.raises(ValueError, match="groups must be a positive int, got True"):
        fast(x, *params, True, 1e-5)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        sa_kernels.FusedShuffleAttention(32, G=4, backend="cpu")([1.0])


def test_empty_tensors():
    x, params, G = native_args()
    for shape in [(0, 32, 5, 7), (2, 32, 0, 7)]:
        empty = torch.empty(shape)
        out, mean, rstd = FWD(empty, *params, G, 1e-5)
        assert out.shape == shape and mean.shape == shape[:2] and not mean.any()
        grads = BWD(torch.empty(shape), empty, *params, mean, rstd, G, 1e-5)
        assert grads[0].shape == shape and all(not g.any() for g in grads[1:])
