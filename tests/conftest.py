"""Shared fixtures: seeded RNGs, devices, dtypes, backends and per-dtype tolerances."""
import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported (torch._dynamo imports it), so
# choose the interpreter here, before anything else can: without a GPU, the Triton kernels
# then run on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import sa_kernels  # noqa: E402
from helpers import force_torch_own_ops  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HALF_DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed():
    """Every test draws fresh random inputs from a fixed seed, so a failure reproduces."""
    torch.manual_seed(0)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles afresh: a run of hundreds of compiled tests in one process otherwise
    reaches Dynamo's recompile limit on the module's forward (each new module is a new guard)."""
    yield
    torch._dynamo.reset()


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=[torch.float32, torch.float64] + HALF_DTYPES, ids=str)
def dtype(request):
    return request.param


# The torch backend's forward on contiguous planes takes GroupNorm's kernel or its own ops,
# by size (torch_math._forward_path): "torch/own-ops" runs every torch test on the second.
TORCH_OWN_OPS = "torch/own-ops"


@pytest.fixture(params=[*sa_kernels.backends.BACKENDS, TORCH_OWN_OPS])
def backend(request, device, monkeypatch):
    """Each backend that can run on ``device``; skipped with the backend's own reason otherwise.

    Under the interpreter a Triton program takes about a millisecond, so the broad shape grids
    skip Triton on CPU; tests/test_triton.py covers every Triton path on interpreter-sized shapes.
    """
    name = request.param
    if name == TORCH_OWN_OPS:
        force_torch_own_ops(monkeypatch)
        name = "torch"
    reason = sa_kernels.backends.unavailable_reason(name, device)
    if reason is not None:
        pytest.skip(reason)
    if name == "triton" and device.type == "cpu":
        pytest.skip("Triton interpreter: broad grids are too slow; see tests/test_triton.py")
    return name
