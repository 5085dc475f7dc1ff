"""The torch.library ops: opcheck, torch.compile without graph breaks.

torch.export and ONNX are in test_export.py; what the op saves for backward in
test_bench_report.py (the saved-bytes probe)."""
import pytest
import torch

import sa_kernels
from helpers import random_input, random_reference


# The op a compiled graph holds: the native op, or the Python op for the other backends.
OP_NODES = (torch.ops.sa_kernels.forward, torch.ops.sa_kernels.forward.default,
            torch.ops.sa_kernels.shuffle_attention, torch.ops.sa_kernels.shuffle_attention.default)


def op_args(B=2, C=32, H=5, W=7, G=4, dtype=torch.float32, device="cpu", backend="torch"):
    ref = random_reference(C, G, device=device)
    params = [p.detach().reshape(-1).requires_grad_() for p in ref.parameters()]
    x = random_input((B, C, H, W), dtype, device).requires_grad_()
    return (x, *params, G, 1e-5, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_opcheck_forward_and_backward(backend, device, dtype, fmt):
    args = op_args(dtype=dtype, device=device, backend=backend)
    x = args[0].detach().contiguous(memory_format=fmt).requires_grad_()
    args = (x,) + args[1:]
    torch.library.opcheck(torch.ops.sa_kernels.forward.default, args)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    out, mean, rstd = torch.ops.sa_kernels.forward(*detached)
    dy = random_input(out.shape, dtype, device)
    bargs = (dy, *detached[:7], mean, rstd, *detached[7:])
    torch.library.opcheck(torch.ops.sa_kernels.backward.default, bargs)


def test_ops_take_parameters_of_the_references_shapes(backend, device):
    # (1, half, 1, 1) gate parameters, (half,) GroupNorm ones: as flat ones, gradients in each
    # parameter's shape. The torch backend broadcast them against its (B, G, half) statistics.
    args = op_args(device=device, backend=backend)
    x, flat = args[0].detach(), [p.detach() for p in args[1:7]]
    shaped = [p.view(1, -1, 1, 1) for p in flat[:4]] + flat[4:]
    expected = torch.ops.sa_kernels.forward(x, *flat, *args[7:])
    got = torch.ops.sa_kernels.forward(x, *shaped, *args[7:])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    dy = random_input(x.shape, x.dtype, device)
    out, mean, rstd = expected
    expected = torch.ops.sa_kernels.backward(dy, x, *flat, mean, rstd, *args[7:])
    got = torch.ops.sa_kernels.backward(dy, x, *shaped, mean, rstd, *args[7:])
    for g, e, p in zip(got, expected, [x] + shaped):
        assert g.shape == p.shape
        torch.testing.assert_close(g, e.view_as(p))


def test_a_compiled_function_takes_a_changing_group_count(backend, device):
    # Recompiled for a third group count, the graph takes groups as a dynamic size (a SymInt),
    # which the Python op's argument check refused.
    f = torch.compile(lambda x, params, g: sa_kernels.shuffle_attention(x, *params, groups=g, backend=backend),
                      backend="eager")
    for C, G in ((16, 2), (32, 4), (48, 6)):
        ref = random_reference(C, G, device=device)
        x = random_input((2, C, 4, 4), torch.float32, device)
        with torch.no_grad():
            torch.testing.assert_close(f(x, [p.detach() for p in ref.parameters()], G), ref(x))


def test_compile_fullgraph_forward_and_backward(backend, device):
    ref = random_reference(32, 4, device=device)
    fused = sa_kernels.FusedShuffleAttention.from_module(ref, backend=backend)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 3, padding=1), fused).to(device)
    compiled = torch.compile(model, fullgraph=True)
    x = random_input((2, 8, 9, 9), torch.float32, device)
    dy = random_input((2, 32, 9, 9), torch.float32, device)
    out = compiled(x)
    out.backward(dy)
    got = [out.detach()] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected_out = model(x)
    expected_out.backward(dy)
    expected = [expected_out.detach()] + [p.grad for p in model.parameters()]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_compiled_graph_holds_one_forward_op(device):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    fused = sa_kernels.FusedShuffleAttention.from_module(random_reference(16, 2, device=device))
    torch.compile(fused, backend=capture, fullgraph=True)(random_input((1, 16, 4, 4), torch.float32, device))
    (gm,) = graphs
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    ours = [t for t in calls if t in OP_NODES]
    assert len(ours) == 1


def test_eager_calls_of_python_backends_take_one_autograd_node_and_refuse_double_backward(backend, device):
    # Eager calls skip the custom-op dispatch (sa_kernels.ops.EagerForward); a second derivative
    # must still fail loudly, never come out silently as a constant.
    if backend in ("cpu", "cuda"):
        pytest.skip("native backends: test_native.py and test_cuda.py")
    ref = random_reference(16, 2, device=device, dtype=torch.float64)
    fused = sa_kernels.FusedShuffleAttention.from_module(ref, backend=backend)
    x = random_input((2, 16, 3, 4), torch.float64, device).requires_grad_()
    out = fused(x)
    assert type(out.grad_fn).__name__ == "EagerForwardBackward"
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    (expected,) = torch.autograd.grad(ref(x).square().sum(), x)
    torch.testing.assert_close(gx, expected)
    assert gx.requires_grad
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        torch.autograd.grad(gx.sum(), x)
