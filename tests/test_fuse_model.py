"""fuse_model on the Shuffle Attention code people run: recognised by structure, verified before each
swap, never silent. The modules here are written from the semantics, one per interface seen in public
copies (SA-Net's own ``sa_layer``, External-Attention-pytorch's ``ShuffleAttention``, renamed
parameters), plus look-alikes that compute something else."""
import copy
import datetime
import faulthandler
import io
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import Parameter

from sa_kernels import FuseError, FusedShuffleAttention, ShuffleAttention, fuse_model
from sa_kernels.models import sa_resnet50
from helpers import PARAM_GRAD_RTOL, gloo_on_loopback, TOLERANCES, assert_rel_close, random_input, random_reference


def shuffle_attention(x, groups, cweight, cbias, sweight, sbias, gn):
    """The semantics: split C into ``groups`` groups; in each, the first half is gated by
    sigmoid(cweight * plane mean + cbias), the second by sigmoid(sweight * GroupNorm(plane) + sbias);
    then output channel 2k + j is channel j * C/2 + k of the gated tensor (a shuffle of 2 groups)."""
    b, c, h, w = x.shape
    half = c // (2 * groups)
    sub = x.reshape(b * groups, 2 * half, h, w)
    xc, xs = sub[:, :half], sub[:, half:]
    cgate = torch.sigmoid(cweight.reshape(1, half, 1, 1) * xc.mean(dim=(2, 3), keepdim=True)
                          + cbias.reshape(1, half, 1, 1))
    sgate = torch.sigmoid(sweight.reshape(1, half, 1, 1) * gn(xs) + sbias.reshape(1, half, 1, 1))
    gated = torch.cat([xc * cgate, xs * sgate], dim=1).reshape(b, c, h, w)
    return gated.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


def gates(half, shape=None):
    """The usual initial values: weights 0, biases 1 (channel weight, channel bias, spatial weight, spatial bias)."""
    shape = (1, half, 1, 1) if shape is None else shape
    return [Parameter(torch.full(shape, v)) for v in (0.0, 1.0, 0.0, 1.0)]


class OfficialSALayer(nn.Module):
    """SA-Net's interface, ``sa_layer(channel, groups=64)``: the group count in ``groups``, no ``channel``."""

    def __init__(self, channel, groups=64):
        super().__init__()
        half = channel // (2 * groups)
        self.groups = groups
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.cweight, self.cbias, self.sweight, self.sbias = gates(half)
        self.sigmoid = nn.Sigmoid()
        self.gn = nn.GroupNorm(half, half)

    def forward(self, x):
        return shuffle_attention(x, self.groups, self.cweight, self.cbias, self.sweight, self.sbias, self.gn)


class EAShuffleAttention(nn.Module):
    """External-Attention-pytorch's interface, ``ShuffleAttention(channel=512, reduction=16, G=8)``."""

    def __init__(self, channel=512, reduction=16, G=8):
        super().__init__()
        half = channel // (2 * G)
        self.G, self.channel = G, channel
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.gn = nn.GroupNorm(half, half)
        self.cweight, self.cbias, self.sweight, self.sbias = gates(half)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        return shuffle_attention(x, self.G, self.cweight, self.cbias, self.sweight, self.sbias, self.gn)


class RenamedSA(nn.Module):
    """``weight_c/bias_c/weight_s/bias_s``, registered in another order, and the GroupNorm called ``norm``."""

    def __init__(self, channel, groups):
        super().__init__()
        half = channel // (2 * groups)
        self.groups = groups
        self.norm = nn.GroupNorm(half, half)
        weight_c, bias_c, weight_s, bias_s = gates(half)
        self.weight_c, self.weight_s, self.bias_c, self.bias_s = weight_c, weight_s, bias_c, bias_s

    def forward(self, x):
        return shuffle_attention(x, self.groups, self.weight_c, self.bias_c, self.weight_s, self.bias_s, self.norm)


class ChannelSpatialSA(nn.Module):
    """``channel_weight/channel_bias/spatial_weight/spatial_bias``, 1-D, ``group_norm``, ``G``."""

    def __init__(self, channels, G):
        super().__init__()
        half = channels // (2 * G)
        self.G = G
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.channel_weight, self.channel_bias, self.spatial_weight, self.spatial_bias = gates(half, (half,))
        self.group_norm = nn.GroupNorm(half, half)

    def forward(self, x):
        return shuffle_attention(x, self.G, self.channel_weight, self.channel_bias, self.spatial_weight,
                                 self.spatial_bias, self.group_norm)


FORMS = {
    "official": lambda: OfficialSALayer(32, groups=4),
    "ea_pytorch": lambda: EAShuffleAttention(32, G=4),
    "reference": lambda: ShuffleAttention(32, G=4),
    "renamed": lambda: RenamedSA(32, 4),
    "channel_spatial": lambda: ChannelSpatialSA(32, 4),
}


# Look-alikes: SA-Net's structure, another computation.

class WrongShuffle(OfficialSALayer):
    """Shuffles with ``groups`` groups instead of 2."""

    def forward(self, x):
        b, c, h, w = x.shape
        out = super().forward(x)  # undo SA's shuffle, apply another
        out = out.reshape(b, c // 2, 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return out.reshape(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ChannelBranchOnly(OfficialSALayer):
    """Both halves gated by the channel branch (at the initial values both gates are sigmoid(1))."""

    def forward(self, x):
        return shuffle_attention(x, self.groups, self.cweight, self.cbias, self.cweight, self.cbias,
                                 lambda xs: xs.mean(dim=(2, 3), keepdim=True).expand_as(xs))


class SpatialWithoutNorm(OfficialSALayer):
    """The spatial gate reads the raw plane, not its GroupNorm (the same as SA while sweight = 0)."""

    def forward(self, x):
        return shuffle_attention(x, self.groups, self.cweight, self.cbias, self.sweight, self.sbias,
                                 lambda xs: xs)


class ResidualSA(OfficialSALayer):
    """SA plus the input."""

    def forward(self, x):
        return super().forward(x) + x


class OtherInitSA(OfficialSALayer):
    """Another initialisation (weights 1, biases 0), the same computation: Shuffle Attention all the same."""

    def __init__(self, channel, groups=64):
        super().__init__(channel, groups)
        with torch.no_grad():
            for p, v in zip((self.cweight, self.cbias, self.sweight, self.sbias), (1.0, 0.0, 1.0, 0.0)):
                p.fill_(v)


LOOK_ALIKES = [WrongShuffle, ChannelBranchOnly, SpatialWithoutNorm, ResidualSA]


def randomise(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.8 + 0.2)
    return module


class Host(nn.Module):
    """conv -> SA -> ReLU -> SA-sized conv: a model with one attention module inside."""

    def __init__(self, sa):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.body = nn.Sequential(sa, nn.ReLU())
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def host(form, dtype=torch.float64, random_params=True, seed=0):
    model = Host(form).to(dtype)
    return randomise(model, seed) if random_params else model


def forward_backward(model, x, dy):
    x = x.detach().clone().requires_grad_()
    for p in model.parameters():
        p.grad = None
    out = model(x)
    out.backward(dy)
    return out.detach(), x.grad


def assert_same_function(model, original_copy, params, copy_params, dtype=torch.float64):
    """``model`` (fused) and its unfused copy: the same output, dx and gradient of every parameter
    (``params``/``copy_params``: the parameters of each, in the original order)."""
    x = random_input((2, 3, 6, 7), dtype, "cpu")
    dy = random_input((2, 4, 6, 7), dtype, "cpu")
    out, dx = forward_backward(model, x, dy)
    ref_out, ref_dx = forward_backward(original_copy, x, dy)
    torch.testing.assert_close(out, ref_out, **TOLERANCES[dtype])
    torch.testing.assert_close(dx, ref_dx, **TOLERANCES[dtype])
    for i, (p, q) in enumerate(zip(params, copy_params)):
        assert_rel_close(p.grad, q.grad.to(torch.float64), PARAM_GRAD_RTOL[dtype], f"parameter {i}")


# ----- which modules are swapped

@pytest.mark.parametrize("form", list(FORMS))
def test_each_interface_is_swapped_and_computes_the_same_in_float64(form):
    model = host(FORMS[form]())
    original_class = type(model.body[0]).__name__
    original_copy = copy.deepcopy(model)
    params = list(model.parameters())
    out, report = fuse_model(model, backend="torch", report=True)
    assert out is model
    assert isinstance(model.body[0], FusedShuffleAttention) and model.body[0].backend == "torch"
    assert report.swapped == [("body.0", original_class)] and not report.skipped
    assert report.swapped_classes() == {original_class: 1}
    # The same Parameter objects, nothing else: an optimizer built before still holds them all.
    assert {id(p) for p in model.parameters()} == {id(p) for p in params}
    assert_same_function(model, original_copy, params, list(original_copy.parameters()))


@pytest.mark.parametrize("params", ["initial", "random"])
@pytest.mark.parametrize("look_alike", LOOK_ALIKES, ids=lambda c: c.__name__)
def test_look_alikes_are_left_alone_with_the_reason(look_alike, params):
    model = Host(look_alike(32, groups=4)).double()
    if params == "random":
        randomise(model)
    sa = model.body[0]
    x = random_input((2, 3, 5, 5), torch.float64, "cpu")
    expected = model(x)
    _, report = fuse_model(model, report=True)
    assert model.body[0] is sa and not report.swapped
    [(name, cls, reason)] = report.skipped
    assert (name, cls) == ("body.0", look_alike.__name__)
    assert "does not compute Shuffle Attention" in reason
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("look_alike", [ChannelBranchOnly, SpatialWithoutNorm], ids=lambda c: c.__name__)
def test_a_look_alike_that_agrees_at_its_initial_values_is_caught_with_random_ones(look_alike):
    _, report = fuse_model(look_alike(32, groups=4).double(), report=True)
    assert "with random parameters" in report.skipped[0][2]
    _, report = fuse_model(randomise(look_alike(32, groups=4).double()), report=True)
    assert "with its current parameters" in report.skipped[0][2]


def test_another_initialisation_of_the_same_computation_is_swapped():
    model = host(OtherInitSA(32, groups=4), random_params=False)
    original_copy, params = copy.deepcopy(model), list(model.parameters())
    _, report = fuse_model(model, report=True)
    assert report.swapped == [("body.0", "OtherInitSA")]
    assert torch.equal(model.body[0].cweight, torch.ones(1, 4, 1, 1, dtype=torch.float64))
    assert_same_function(model, original_copy, params, list(original_copy.parameters()))


def _no_group_count():
    sa = OfficialSALayer(32, groups=4)
    del sa.groups
    return sa


def _wrong_norm():
    sa = OfficialSALayer(32, groups=4)
    sa.gn = nn.GroupNorm(1, 4)
    return sa


def _not_affine():
    sa = OfficialSALayer(32, groups=4)
    sa.gn = nn.GroupNorm(4, 4, affine=False)
    return sa


def _extra_parameter():
    sa = OfficialSALayer(32, groups=4)
    sa.alpha = Parameter(torch.ones(1))
    return sa


def _extra_buffer():
    sa = OfficialSALayer(32, groups=4)
    sa.register_buffer("calls", torch.zeros(()), persistent=False)
    return sa


def _hooked():
    sa = OfficialSALayer(32, groups=4)
    sa.register_forward_hook(lambda module, args, out: None)
    return sa


def _channel_disagrees():
    sa = EAShuffleAttention(32, G=4)
    sa.channel = 64
    return sa


def _groups_disagree():
    sa = EAShuffleAttention(32, G=4)
    sa.groups = 2
    return sa


def _buffers_not_parameters():
    sa = OfficialSALayer(32, groups=4)
    weight = sa.cweight.detach()
    del sa.cweight
    sa.register_buffer("cweight", weight)
    return sa


def _on_meta():
    return OfficialSALayer(32, groups=4).to("meta")


UNFIT = [
    (_no_group_count, "no integer group count attribute"),
    (_wrong_norm, r"GroupNorm\(1, 4, affine=True\), expected an affine GroupNorm\(4, 4\)"),
    (_not_affine, "affine=False"),
    (_extra_parameter, "holds state the fused module has no place for: alpha"),
    (_extra_buffer, "no place for: calls"),
    (_hooked, "hooks on itself would not carry over"),
    (_channel_disagrees, r"channel=64 but .* 2 \* 4 \* 4 = 32"),
    (_groups_disagree, "group count attributes disagree"),
    (_buffers_not_parameters, "not Parameters registered on the module itself: cweight"),
    (_on_meta, "meta device"),
]


@pytest.mark.parametrize("build,reason", UNFIT, ids=[build.__name__[1:] for build, _ in UNFIT])
def test_unfit_candidates_are_left_alone_with_the_reason(build, reason):
    model = nn.Sequential(nn.Identity(), build())
    sa = model[1]
    _, report = fuse_model(model, report=True)
    assert model[1] is sa and not report.swapped
    [(name, cls, why)] = report.skipped
    assert (name, cls) == ("1", type(sa).__name__)
    assert re.search(reason, why), why


# ----- what the swap keeps

@pytest.mark.parametrize("form", ["official", "renamed", "channel_spatial"])
def test_an_optimizer_built_before_the_swap_trains_the_swapped_parameters(form):
    model = host(FORMS[form]())
    original_copy = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    copy_optimizer = torch.optim.SGD(original_copy.parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    fuse_model(model)
    x = random_input((2, 3, 5, 6), torch.float64, "cpu")
    for _ in range(2):
        for m, opt in ((model, optimizer), (original_copy, copy_optimizer)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    sa_params = list(model.body[0].parameters())
    assert all(any(p is q for group in optimizer.param_groups for q in group["params"]) for p in sa_params)
    for p, q, p0 in zip(optimizer.param_groups[0]["params"], copy_optimizer.param_groups[0]["params"], before):
        assert not torch.equal(p, p0)
        torch.testing.assert_close(p, q, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("form", list(FORMS))
def test_state_dict_keys_are_unchanged_and_checkpoints_load_both_ways(form):
    model = host(FORMS[form]())
    keys = list(model.state_dict())
    fuse_model(model)
    assert list(model.state_dict()) == keys
    # A checkpoint of the fused model loads strictly into the unfused model, and back.
    fresh = host(FORMS[form](), seed=1)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    x = random_input((2, 3, 4, 5), torch.float64, "cpu")
    torch.testing.assert_close(fresh(x), model(x), **TOLERANCES[torch.float64])
    other = host(FORMS[form](), seed=2)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(model(x), other(x), **TOLERANCES[torch.float64])
    # Copies of the fused model keep the original key names too.
    for clone in (copy.deepcopy(model), _pickled(model)):
        assert list(clone.state_dict()) == keys
        torch.testing.assert_close(clone(x), other(x), **TOLERANCES[torch.float64])


def _pickled(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_train_and_eval_modes_are_kept():
    model = nn.Sequential(randomise(OfficialSALayer(32, 4)), randomise(RenamedSA(32, 4)).eval())
    fuse_model(model)
    assert model.training and model[0].training and not model[1].training


class DropoutChildSA(OfficialSALayer):
    """A look-alike whose stateless child acts in training mode only."""

    def __init__(self, channel, groups=64):
        super().__init__(channel, groups)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(super().forward(x))


def test_a_look_alike_that_differs_only_in_training_is_left_alone_from_eval_mode():
    # Checked in the mode the model is in, it would pass in eval mode and lose its dropout
    # once the model trains again: both modes are checked, and the modes are left as found.
    model = nn.Sequential(randomise(OfficialSALayer(32, 4)), DropoutChildSA(32, 4)).eval()
    model[1].drop.train()
    _, report = fuse_model(model, report=True)
    assert [n for n, _ in report.swapped] == ["0"]
    [(name, _, reason)] = report.skipped
    assert name == "1" and "in training mode" in reason
    assert not model.training and not model[1].training and model[1].drop.training


def test_missing_keys_are_reported_under_the_original_names():
    model = nn.Sequential(randomise(RenamedSA(32, 4)))
    keys = list(model.state_dict())
    fuse_model(model, strict=True)
    partial = model.state_dict()
    del partial["0.weight_c"], partial["0.norm.bias"]
    result = model.load_state_dict(partial, strict=False)
    assert sorted(result.missing_keys) == ["0.norm.bias", "0.weight_c"] and not result.unexpected_keys
    assert set(result.missing_keys) <= set(keys)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "0.weight_c", "0.norm.bias"'):
        model.load_state_dict(partial)
    assert not model[0].load_state_dict(model[0].state_dict()).missing_keys  # its own prefix too


def test_checking_leaves_parameters_gradients_and_rng_untouched():
    class DropoutSA(OfficialSALayer):
        """A look-alike that draws from the global RNG in its forward."""

        def forward(self, x):
            return nn.functional.dropout(super().forward(x), 0.5, self.training)

    model = nn.Sequential(randomise(OfficialSALayer(32, 4)), DropoutSA(32, 4), randomise(RenamedSA(32, 4)))
    versions = [p._version for p in model.parameters()]
    rng = torch.get_rng_state()
    _, report = fuse_model(model, report=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [p._version for p in model.parameters()] == versions
    assert all(p.grad is None for p in model.parameters())
    assert [n for n, _ in report.swapped] == ["0", "2"] and report.skipped[0][:2] == ("1", "DropoutSA")


def test_the_check_runs_outside_the_callers_autocast_and_grad_mode():
    seen = []

    class RecordingSA(OfficialSALayer):
        def forward(self, x):
            seen.append((torch.is_autocast_enabled("cpu"), torch.is_grad_enabled(), x.dtype))
            return super().forward(x)

    model = host(RecordingSA(32, 4), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, report = fuse_model(model, report=True)
    assert report.swapped == [("body.0", "RecordingSA")]
    assert seen == [(False, False, torch.float32)] * 4  # current and random parameters, both modes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_models_are_checked_in_their_own_dtype(dtype):
    model = nn.Sequential(randomise(OfficialSALayer(64, 4)), randomise(WrongShuffle(64, 4)),
                          randomise(RenamedSA(64, 8))).to(dtype)
    _, report = fuse_model(model, report=True)
    assert [n for n, _ in report.swapped] == ["0", "2"]
    assert report.skipped[0][:2] == ("1", "WrongShuffle")
    assert model[0].cweight.dtype == dtype


def test_a_module_reachable_twice_becomes_one_fused_module():
    shared = randomise(OfficialSALayer(32, 4))
    model = nn.Sequential(shared, nn.ReLU(), shared)
    _, report = fuse_model(model, report=True)
    assert model[0] is model[2] and isinstance(model[0], FusedShuffleAttention)
    assert report.swapped == [("0", "OfficialSALayer")]


def test_fused_modules_already_there_get_the_backend_and_are_counted():
    model = nn.Sequential(FusedShuffleAttention(32, G=4), randomise(OfficialSALayer(32, 4)))
    _, report = fuse_model(model, backend="torch", report=True)
    assert report.already_fused == ["0"] and report.swapped == [("1", "OfficialSALayer")]
    assert model[0].backend == model[1].backend == "torch"


def test_the_root_itself():
    sa = randomise(OfficialSALayer(32, 4).double())
    fused, report = fuse_model(sa, report=True)
    assert isinstance(fused, FusedShuffleAttention) and report.swapped == [("", "OfficialSALayer")]
    x = random_input((2, 32, 3, 4), torch.float64, "cpu")
    torch.testing.assert_close(fused(x), sa(x), **TOLERANCES[torch.float64])
    look_alike = WrongShuffle(32, 4)
    out, report = fuse_model(look_alike, report=True)
    assert out is look_alike and "(the model itself) (WrongShuffle)" in str(report)


# ----- never silent

def test_report_and_log_say_what_was_done(caplog):
    model = nn.Sequential(randomise(OfficialSALayer(32, 4)), randomise(OfficialSALayer(32, 4)),
                          randomise(RenamedSA(32, 4)), ResidualSA(32, 4), FusedShuffleAttention(32, G=4))
    with caplog.at_level(logging.INFO, logger="sa_kernels"):
        out, report = fuse_model(model, report=True)
    assert out is model
    assert report.swapped_classes() == {"OfficialSALayer": 2, "RenamedSA": 1}
    assert report.already_fused == ["4"] and [s[:2] for s in report.skipped] == [("3", "ResidualSA")]
    text = str(report)
    assert text.startswith("fuse_model swapped 3 module(s) for FusedShuffleAttention "
                           "(2 OfficialSALayer, 1 RenamedSA), found 1 already fused, left 1 alone:")
    assert "\n  3 (ResidualSA): it does not compute Shuffle Attention" in text
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "sa_kernels"]
    assert records[0] == (logging.INFO, report.summary())
    assert records[1][0] == logging.WARNING and records[1][1].startswith("fuse_model left 3 (ResidualSA) alone: ")
    assert len(records) == 2


def test_finding_nothing_is_a_warning(caplog):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8))
    with caplog.at_level(logging.INFO, logger="sa_kernels"):
        out, report = fuse_model(model, report=True)
    assert out is model and not report.found_any
    [record] = [r for r in caplog.records if r.name == "sa_kernels"]
    assert record.levelno == logging.WARNING and "found no Shuffle Attention module" in record.getMessage()


def test_strict_raises_before_changing_anything():
    model = nn.Sequential(randomise(OfficialSALayer(32, 4)), ResidualSA(32, 4))
    children = list(model)
    with pytest.raises(FuseError, match=r"left 1 alone:\n  1 \(ResidualSA\)") as info:
        fuse_model(model, strict=True)
    assert list(model) == children  # the fit one was not swapped either
    assert info.value.report.swapped == [("0", "OfficialSALayer")]
    with pytest.raises(FuseError, match="found no Shuffle Attention module"):
        fuse_model(nn.Sequential(nn.Conv2d(3, 3, 1)), strict=True)
    model = nn.Sequential(randomise(OfficialSALayer(32, 4)), FusedShuffleAttention(32, G=4))
    fuse_model(model, strict=True)
    assert isinstance(model[0], FusedShuffleAttention)


# ----- wrappers and whole models

def test_inside_data_parallel():
    model = host(OfficialSALayer(32, 4))
    original_copy, params = copy.deepcopy(model), list(model.parameters())
    wrapped = nn.DataParallel(model)
    out, report = fuse_model(wrapped, report=True)
    assert out is wrapped and isinstance(wrapped.module.body[0], FusedShuffleAttention)
    assert report.swapped == [("module.body.0", "OfficialSALayer")]
    assert_same_function(wrapped, original_copy, params, list(original_copy.parameters()))


DDP_DEADLINE_S = 180  # a child that imports torch and runs two steps; a hang fails the test


def ddp_reducer_check(store_path):
    """The DDP test's body, run in a child process: one process, world size 1. DDP's reducer
    tracks the Parameter objects it was built with: had the swap replaced any, they would get
    no gradient and the second backward would fail."""
    faulthandler.dump_traceback_later(DDP_DEADLINE_S - 30, exit=True)  # a hang shows its stack
    gloo_on_loopback()
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = host(RenamedSA(32, 4), dtype=torch.float32)
        original_copy, params = copy.deepcopy(model), list(model.parameters())
        ddp = nn.parallel.DistributedDataParallel(model)
        _, report = fuse_model(ddp, report=True)
        assert report.swapped == [("module.body.0", "RenamedSA")]
        x = random_input((2, 3, 4, 4), torch.float32, "cpu")
        for _ in range(2):
            for p in params:
                p.grad = None
            ddp(x).sum().backward()
            assert all(p.grad is not None for p in params)
        torch.testing.assert_close(ddp(x), original_copy(x), **TOLERANCES[torch.float32])
        assert list(ddp.state_dict()) == ["module." + k for k in original_copy.state_dict()]
    finally:
        dist.destroy_process_group()
    # Checked: leave before this frame's locals (DDP's reducer) are torn down after their process
    # group. That teardown once hung in a CI run (2026-11-28: the faulthandler stack showed no
    # frame of this function, only the caller's line and a native thread).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo backend")
def test_inside_distributed_data_parallel_the_reducer_keeps_its_parameters(tmp_path):
    # In a child process under a deadline: run in the suite's own process, this test once stalled
    # a CI run for an hour (not reproduced here; gloo was not kept on loopback then, as the
    # two-process DDP test that passed in that run does). A child can be stopped: the suite
    # goes on and the failure shows the child's stack.
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    code = f"import test_fuse_model as t; t.ddp_reducer_check({str(tmp_path / 'store')!r})"
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=DDP_DEADLINE_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"DDP child still running after {DDP_DEADLINE_S} s:\n{e.stdout}\n{e.stderr}")
    assert done.returncode == 0, f"DDP child failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"


def official_sa_resnet50(seed=0):
    """SA-ResNet-50 as SA-Net's repository builds it: its ``sa_layer(planes * 4)`` (groups=64) after
    each bottleneck's last BatchNorm; random SA parameters so every gate matters."""
    model = sa_resnet50(fused=False)
    for block in model.modules():
        if hasattr(block, "sa"):
            block.sa = randomise(OfficialSALayer(block.bn3.num_features, groups=64), seed)
            seed += 1
    return model


def test_official_sa_resnet50_is_fused_end_to_end_and_its_logits_match(caplog):
    model = official_sa_resnet50().eval()
    keys = list(model.state_dict())
    original_copy = copy.deepcopy(model)
    with caplog.at_level(logging.INFO, logger="sa_kernels"):
        out, report = fuse_model(model, backend="torch", report=True)
    assert out is model and report.swapped_classes() == {"OfficialSALayer": 16} and not report.skipped
    assert sum(isinstance(m, FusedShuffleAttention) for m in model.modules()) == 16
    assert not any(isinstance(m, OfficialSALayer) for m in model.modules())
    assert list(model.state_dict()) == keys
    assert "swapped 16 module(s)" in caplog.text
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Measured: logits within 1.1e-6 of the unfused model (logits up to 1.7); 1e-5 as in test_models.py.
        torch.testing.assert_close(model(x), original_copy(x), atol=1e-5, rtol=1e-5)
    # The official layout is ours key for key: its weights load strictly into sa_resnet50.
    sa_resnet50(backend="torch").load_state_dict(original_copy.state_dict())


# ----- from_module

@pytest.mark.parametrize("form", list(FORMS))
def test_from_module_copies_any_interface_into_the_reference_layout(form):
    sa = randomise(FORMS[form]().double())
    fused = FusedShuffleAttention.from_module(sa, backend="torch")
    assert list(fused.state_dict()) == ["cweight", "cbias", "sweight", "sbias", "gn.weight", "gn.bias"]
    assert fused.backend == "torch" and fused.cweight.shape == (1, 4, 1, 1)
    assert not any(p is q for p in fused.parameters() for q in sa.parameters())
    x = random_input((2, 32, 3, 5), torch.float64, "cpu")
    torch.testing.assert_close(fused(x), sa(x), **TOLERANCES[torch.float64])


def test_from_module_refuses_a_look_alike_with_the_reason():
    with pytest.raises(ValueError, match="cannot fuse WrongShuffle: it does not compute Shuffle Attention"):
        FusedShuffleAttention.from_module(WrongShuffle(32, 4))


# ----- moved from test_module.py: a user's copy of the seed with the seed's attributes

class SeedLike(nn.Module):
    """A user's own copy of the seed's module: same attributes, another class."""

    def __init__(self, channel, G):
        super().__init__()
        ref = ShuffleAttention(channel, G=G)
        self.G, self.channel, self.gn = G, channel, ref.gn
        self.cweight, self.cbias, self.sweight, self.sbias = ref.cweight, ref.cbias, ref.sweight, ref.sbias
        self.avg_pool, self.sigmoid = ref.avg_pool, ref.sigmoid
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn_like(p))

    channel_shuffle = staticmethod(ShuffleAttention.channel_shuffle)
    forward = ShuffleAttention.forward


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.blocks = nn.Sequential(ShuffleAttention(32, G=2), nn.ReLU(), SeedLike(32, 4))
        self.head = nn.ModuleList([nn.Conv2d(32, 64, 1), random_reference(64, 8)])
        self.already = FusedShuffleAttention(64, G=4)

    def forward(self, x):
        return self.already(self.head[1](self.head[0](self.blocks(self.stem(x)))))


def test_fuse_model_swaps_every_shuffle_attention_like_module():
    net = Net()
    before = {n: p for n, p in net.named_parameters()}
    x = random_input((2, 3, 8, 8), torch.float32, "cpu")
    expected = net(x)
    out = fuse_model(net, backend="torch")
    assert out is net
    assert isinstance(net.blocks[0], FusedShuffleAttention) and isinstance(net.blocks[2], FusedShuffleAttention)
    assert isinstance(net.head[1], FusedShuffleAttention)
    assert all(m.backend == "torch" for m in net.modules() if isinstance(m, FusedShuffleAttention))
    assert not any(isinstance(m, (ShuffleAttention, SeedLike)) for m in net.modules())
    # The swap keeps the Parameter objects, so an optimizer built before it still applies.
    after = dict(net.named_parameters())
    assert list(after) == list(before) and all(after[n] is before[n] for n in before)
    torch.testing.assert_close(net(x), expected)


def test_fuse_model_on_a_shuffle_attention_root():
    ref = random_reference(16, 2)
    fused = fuse_model(ref)
    assert isinstance(fused, FusedShuffleAttention)
    x = random_input((1, 16, 3, 3), torch.float32, "cpu")
    torch.testing.assert_close(fused(x), ref(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs in a GPU session)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_already_on_a_gpu_is_checked_and_swapped_there(dtype):
    model = nn.Sequential(randomise(OfficialSALayer(64, 4)), randomise(WrongShuffle(64, 4))).to("cuda", dtype)
    rng = torch.cuda.get_rng_state()
    _, report = fuse_model(model, report=True)
    assert [n for n, _ in report.swapped] == ["0"] and report.skipped[0][:2] == ("1", "WrongShuffle")
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    assert model[0].cweight.device.type == "cuda" and model[0].cweight.dtype == dtype
    x = random_input((2, 64, 9, 7), dtype, "cuda")
    with torch.no_grad():
        original = OfficialSALayer(64, 4).to("cuda", dtype)
        original.load_state_dict(model[0].state_dict())
        torch.testing.assert_close(model[0](x), original(x), **TOLERANCES[dtype])
