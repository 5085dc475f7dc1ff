"""Deployment: torch.export keeps the fused op; ONNX export (both exporters) decomposes it into standard operators."""
import io

import pytest
import torch
from torch import nn

import sa_kernels
from sa_kernels.decomposition import forward_decomposed
from sa_kernels.models import sa_resnet50
from helpers import TOLERANCES, random_input, random_reference

# ONNX Runtime computes the same float32 function with its own kernels (reductions in another
# order); measured within 2.4e-7 of eager PyTorch on this network.
ORT_TOL = dict(atol=1e-5, rtol=1e-5)


# The native op (cpu) and the Python op (torch) both export.
BACKENDS = ["cpu", "torch"]


def small_sa_net(backend, G=4, channel=48):
    """Conv -> FusedShuffleAttention (random parameters) -> ReLU -> Conv: the 1x1 conv after SA
    mixes channels with random weights, so a wrong channel shuffle changes the output."""
    sa = sa_kernels.FusedShuffleAttention.from_module(random_reference(channel, G), backend=backend)
    return nn.Sequential(nn.Conv2d(3, channel, 3, padding=1), sa, nn.ReLU(), nn.Conv2d(channel, 8, 1)).eval()


def sa_ops(graph):
    return [n for n in graph.nodes if n.op == "call_function" and "sa_kernels" in str(n.target)]


def assert_standard_onnx(model_proto):
    """Every node in the default (ai.onnx) domain, no local functions, no custom opset imported."""
    onnx = pytest.importorskip("onnx")
    onnx.checker.check_model(model_proto, full_check=True)
    assert not model_proto.functions, [f.name for f in model_proto.functions]
    assert {o.domain for o in model_proto.opset_import} <= {"", "ai.onnx"}

    def walk(graph):
        for node in graph.node:
            assert node.domain in ("", "ai.onnx"), f"{node.op_type} in domain {node.domain!r}"
            for attr in node.attribute:
                for sub in [attr.g] * attr.HasField("g") + list(attr.graphs):
                    walk(sub)
    walk(model_proto.graph)
    op_types = {n.op_type for n in model_proto.graph.node}
    # The channel shuffle must be in the graph, not lost: it is the only Transpose here.
    assert "Transpose" in op_types and "Sigmoid" in op_types, op_types


def run_onnxruntime(model_bytes, x):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


@pytest.mark.parametrize("shape", [(2, 48, 7, 5), (1, 48, 1, 1), (3, 24, 3, 11)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decomposition_matches_fused_op(shape, dtype):
    G = shape[1] // 12
    ref = random_reference(shape[1], G, dtype=dtype)
    x = random_input(shape, dtype, "cpu", memory_format=torch.channels_last)
    params = [p.reshape(-1) for p in (ref.cweight, ref.cbias, ref.sweight, ref.sbias, ref.gn.weight, ref.gn.bias)]
    expected = torch.ops.sa_kernels.forward(x, *params, G, 1e-5, "torch")
    got = forward_decomposed(x, *params, G, 1e-5)
    for name, a, b in zip(("out", "mean", "rstd"), got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, **TOLERANCES[dtype], msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(got[0], ref(x), **TOLERANCES[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_export_keeps_fused_op_and_matches_eager(backend):
    model, x = small_sa_net(backend), torch.randn(2, 3, 9, 7)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    assert len(sa_ops(ep.graph)) == 1
    # Saved and loaded like any exported program (the op is registered by importing sa_kernels).
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    for batch_size in (2, 5):
        xb = torch.randn(batch_size, 3, 9, 7)
        with torch.no_grad():
            expected = model(xb)
            torch.testing.assert_close(ep.module()(xb), expected, rtol=0, atol=0)
            torch.testing.assert_close(loaded.module()(xb), expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_export_sa_resnet50(backend):
    model, x = sa_resnet50(fused=True, backend=backend, num_classes=10).eval(), torch.randn(1, 3, 64, 64)
    ep = torch.export.export(model, (x,))
    assert len(sa_ops(ep.graph)) == 16
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_decompositions_removes_the_op(backend):
    model, x = small_sa_net(backend), torch.randn(2, 3, 9, 7)
    ep = torch.export.export(model, (x,)).run_decompositions(sa_kernels.decompositions())
    assert sa_ops(ep.graph) == []
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_onnx_dynamo_exporter(backend):
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript (pip install onnxscript)")
    model, x = small_sa_net(backend), torch.randn(2, 3, 9, 7)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    assert_standard_onnx(program.model_proto)
    assert not torch.onnx.is_in_onnx_export()
    for batch_size in (2, 3):
        xb = torch.randn(batch_size, 3, 9, 7)
        with torch.no_grad():
            expected = model(xb)
        torch.testing.assert_close(run_onnxruntime(program.model_proto.SerializeToString(), xb), expected,
                                   **ORT_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_onnx_dynamo_exporter_from_decomposed_exported_program(backend):
    """A program exported earlier (holding the fused op) converts once decomposed."""
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript (pip install onnxscript)")
    model, x = small_sa_net(backend), torch.randn(2, 3, 9, 7)
    ep = torch.export.export(model, (x,)).run_decompositions(sa_kernels.decompositions())
    program = torch.onnx.export(ep, verbose=False)
    assert_standard_onnx(program.model_proto)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(run_onnxruntime(program.model_proto.SerializeToString(), x), expected, **ORT_TOL)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_onnx_torchscript_exporter(backend):
    pytest.importorskip("onnx")
    model, x = small_sa_net(backend), torch.randn(2, 3, 9, 7)
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    import onnx
    assert_standard_onnx(onnx.load_from_string(buffer.getvalue()))
    for batch_size in (2, 3):
        xb = torch.randn(batch_size, 3, 9, 7)
        with torch.no_grad():
            expected = model(xb)
        torch.testing.assert_close(run_onnxruntime(buffer.getvalue(), xb), expected, **ORT_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_traced_module_records_one_op_and_trains(backend):
    # torch.jit.trace of the torch backend recorded its eager ops one by one, out= ops among
    # them: the traced module failed on its first call with gradients enabled.
    ref = random_reference(24, 3, dtype=torch.float64)
    fused = sa_kernels.FusedShuffleAttention.from_module(ref, backend=backend)
    x = random_input((2, 24, 5, 7), torch.float64, "cpu")
    traced = torch.jit.trace(fused, (x,))
    assert len([n for n in traced.graph.nodes() if n.kind().startswith("sa_kernels::")]) == 1
    x2 = random_input((3, 24, 4, 6), torch.float64, "cpu").requires_grad_()
    out = traced(x2)
    out.backward(torch.ones_like(out) + x2.detach())
    x_ref = x2.detach().clone().requires_grad_()
    expected = ref(x_ref)
    expected.backward(torch.ones_like(expected) + x_ref.detach())
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float64])
    torch.testing.assert_close(x2.grad, x_ref.grad, **TOLERANCES[torch.float64])
    for (name, a), (_, b) in zip(fused.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOLERANCES[torch.float64], msg=name)

