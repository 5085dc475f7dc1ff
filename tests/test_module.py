"""The drop-in contract: constructor, parameters, state_dict, from_module, errors (fuse_model: test_fuse_model.py)."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import sa_kernels
from sa_kernels import FusedShuffleAttention, ShuffleAttention
from helpers import random_input, random_reference


def test_same_parameters_init_and_state_dict_keys():
    ref, fused = ShuffleAttention(256, 16, 8), FusedShuffleAttention(256, 16, 8)
    assert list(ref.state_dict()) == list(fused.state_dict()) == [
        "cweight", "cbias", "sweight", "sbias", "gn.weight", "gn.bias"]
    for (n, a), (m, b) in zip(ref.named_parameters(), fused.named_parameters()):
        assert n == m and a.shape == b.shape and torch.equal(a, b)
    assert fused.gn.eps == ref.gn.eps


def test_default_constructor_matches_the_seed():
    fused = FusedShuffleAttention()
    assert (fused.channel, fused.G, fused.backend) == (512, 8, "auto")
    assert fused.cweight.shape == (1, 32, 1, 1)


def test_checkpoints_load_both_ways():
    ref = random_reference(64, 4)
    fused = FusedShuffleAttention(64, G=4)
    fused.load_state_dict(ref.state_dict())
    x = random_input((2, 64, 7, 7), torch.float32, "cpu")
    torch.testing.assert_close(fused(x), ref(x))

    fused2 = FusedShuffleAttention.from_module(random_reference(64, 4))
    ref2 = ShuffleAttention(64, G=4)
    buffer = io.BytesIO()
    torch.save(fused2.state_dict(), buffer)
    buffer.seek(0)
    ref2.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(ref2(x), fused2(x))


def test_from_module_copies_values_device_dtype_and_flags():
    ref = random_reference(32, 2, dtype=torch.float64)
    ref.gn.eps = 1e-3
    ref.sbias.requires_grad_(False)
    ref.eval()
    fused = FusedShuffleAttention.from_module(ref, backend="torch")
    assert fused.backend == "torch" and fused.gn.eps == 1e-3 and not fused.training
    assert not fused.sbias.requires_grad and fused.cweight.requires_grad
    for a, b in zip(ref.parameters(), fused.parameters()):
        assert a.dtype == b.dtype and torch.equal(a, b)
        assert a.data_ptr() != b.data_ptr()  # a copy, not a view
    x = random_input((2, 32, 5, 5), torch.float64, "cpu")
    torch.testing.assert_close(fused(x), ref(x))


def test_from_module_rejects_non_shuffle_attention():
    with pytest.raises(TypeError, match="ShuffleAttention-like"):
        FusedShuffleAttention.from_module(nn.Conv2d(3, 3, 1))
    bad = ShuffleAttention(16, G=2)
    bad.gn = nn.GroupNorm(2, 4)
    with pytest.raises(ValueError, match="GroupNorm"):
        FusedShuffleAttention.from_module(bad)


def test_extra_repr_shows_channel_groups_and_backend():
    assert "channel=64, G=4, backend='torch'" in repr(FusedShuffleAttention(64, G=4, backend="torch"))


def test_deepcopy_and_pickle_round_trip():
    fused = FusedShuffleAttention.from_module(random_reference(32, 4), backend="torch")
    x = random_input((2, 32, 4, 4), torch.float32, "cpu")
    expected = fused(x)
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert clone.backend == "torch" and clone.G == 4
        torch.testing.assert_close(clone(x), expected)


@pytest.mark.parametrize("channel,G", [(30, 4), (8, 8)])
def test_construction_rejects_channel_not_divisible_by_2G(channel, G):
    with pytest.raises(ValueError, match=rf"channel must be divisible by 2\*G: got channel={channel}, "
                                         rf"G={G} \(channel % {2 * G} = {channel % (2 * G)}\)"):
        FusedShuffleAttention(channel, G=G)


def test_construction_rejects_a_channel_count_below_1():
    with pytest.raises(ValueError, match="channel must be a positive int, got channel=0"):
        FusedShuffleAttention(0, G=1)


def test_construction_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        FusedShuffleAttention(16, G=2, backend="cudnn")


@pytest.mark.parametrize("x,error,match", [
    (torch.randn(16, 5, 5), ValueError, "4-D.*3-D"),
    (torch.randn(1, 2, 16, 5, 5), ValueError, "4-D.*5-D"),
    (torch.randn(2, 32, 5, 5), ValueError, r"x has 32 channels, expected 2 \* G \* half = .* = 16"),
    (torch.randint(0, 5, (2, 16, 5, 5)), TypeError, "floating dtype.*torch.int64"),
    (torch.randn(2, 16, 5, 5, dtype=torch.complex64), TypeError, "floating dtype.*complex64"),
])
def test_call_time_errors_name_expected_and_actual(x, error, match):
    with pytest.raises(error, match=match):
        FusedShuffleAttention(16, G=2)(x)


def test_functional_errors_name_expected_and_actual():
    ref = random_reference(16, 2)
    params = list(ref.parameters())
    x = random_input((2, 16, 4, 4), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"x has 16 channels, expected 2 \* G \* half = 2 \* 4 \* 4 = 32"):
        sa_kernels.shuffle_attention(x, *params, groups=4)
    with pytest.raises(ValueError, match=r"gn_bias has 3 elements.*expected half = 4"):
        sa_kernels.shuffle_attention(x, *params[:5], torch.zeros(3), groups=2)
    with pytest.raises(ValueError, match="sweight is on meta, expected x's device cpu"):
        sa_kernels.shuffle_attention(x, *params[:2], params[2].to("meta"), *params[3:], groups=2)
    with pytest.raises(ValueError, match="groups must be a positive int"):
        sa_kernels.shuffle_attention(x, *params, groups=0)


def test_parameters_on_another_device_are_rejected_by_the_module():
    fused = FusedShuffleAttention(16, G=2).to("meta")
    with pytest.raises(ValueError, match="cweight is on meta, expected x's device cpu"):
        fused(torch.randn(2, 16, 3, 3))


def test_available_backends_and_auto_on_cpu():
    available = sa_kernels.available_backends("cpu")  # triton too, under the interpreter
    assert available[-2:] == ["cpu", "torch"]  # the native CPU kernels are built
    assert sa_kernels.backends.resolve_name("auto", torch.device("cpu")) == "cpu"


def test_unavailable_backend_says_why_and_how():
    x = torch.randn(2, 16, 3, 3)
    with pytest.raises(sa_kernels.BackendUnavailableError, match="backend 'cuda' cannot run on cpu: .+"):
        FusedShuffleAttention(16, G=2, backend="cuda")(x)


def test_environment_variable_overrides_auto(monkeypatch):
    x = torch.randn(2, 16, 3, 3)
    monkeypatch.setenv("SA_KERNELS_BACKEND", "cuda")
    with pytest.raises(sa_kernels.BackendUnavailableError, match="backend 'cuda'"):
        FusedShuffleAttention(16, G=2)(x)
    FusedShuffleAttention(16, G=2, backend="torch")(x)  # a name given in code wins
    monkeypatch.setenv("SA_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="SA_KERNELS_BACKEND must be one of"):
        FusedShuffleAttention(16, G=2)(x)
    monkeypatch.setenv("SA_KERNELS_BACKEND", "torch")
    assert sa_kernels.backends.resolve_name("auto", x.device) == "torch"
    FusedShuffleAttention(16, G=2)(x)
    monkeypatch.delenv("SA_KERNELS_BACKEND")
    if sa_kernels.backends.unavailable_reason("cpu", x.device) is None:
        assert sa_kernels.backends.resolve_name("auto", x.device) == "cpu"


def test_autocast_bfloat16_on_cpu():
    conv = nn.Conv2d(8, 32, 1)
    fused = FusedShuffleAttention.from_module(random_reference(32, 4))
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        out = fused(h)
    assert h.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert fused.cweight.dtype == torch.float32
    out.float().sum().backward()
    assert fused.cweight.grad.dtype == torch.float32 and conv.weight.grad is not None
    ref = ShuffleAttention(32, G=4)
    ref.load_state_dict(fused.state_dict())
    torch.testing.assert_close(out.double(), ref.double()(h.detach().double()), atol=1.6e-2, rtol=1.6e-2)
