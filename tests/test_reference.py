"""The reference module against an independent, plane-by-plane reading of the issue's semantics.

Everything else is tested against the reference, so the reference itself is pinned here:
group split, both branches, concat and the 2-group channel shuffle (output channel
2j + i takes input channel i * C/2 + j).
"""
import pytest
import torch

import sa_kernels
from helpers import naive_shuffle_attention, random_reference


@pytest.mark.parametrize("shape,G", [((2, 16, 5, 3), 2), ((2, 8, 1, 1), 1), ((2, 24, 4, 7), 3),
                                     ((1, 128, 2, 2), 64)])
def test_reference_matches_plane_by_plane_semantics(shape, G):
    ref = random_reference(shape[1], G, dtype=torch.float64).eval()
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    with torch.no_grad():
        torch.testing.assert_close(ref(x), naive_shuffle_attention(x, ref), atol=1e-12, rtol=1e-12)


def test_reference_refuses_a_single_value_per_group_norm_plane():
    # F.group_norm rejects B * G == 1 with 1x1 planes; the fused module computes that case
    # (tests/test_shuffle_attention.py checks it against the plane-by-plane semantics).
    with pytest.raises(ValueError, match="more than 1 value"):
        random_reference(8, 1)(torch.randn(1, 8, 1, 1))


def test_reference_accepts_channels_last_where_the_seed_view_fails():
    ref = random_reference(32, 4)
    x = torch.randn(2, 32, 5, 5)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError):
        x_cl.view(2 * 4, -1, 5, 5)  # the seed's first line
    torch.testing.assert_close(ref(x_cl), ref(x))


def test_reference_parameters_as_in_the_seed():
    ref = sa_kernels.ShuffleAttention(channel=64, reduction=16, G=4)
    half = 64 // 8
    assert [n for n, _ in ref.named_parameters()] == [
        "cweight", "cbias", "sweight", "sbias", "gn.weight", "gn.bias"]
    for name, value in (("cweight", 0.0), ("cbias", 1.0), ("sweight", 0.0), ("sbias", 1.0)):
        p = getattr(ref, name)
        assert p.shape == (1, half, 1, 1) and torch.all(p == value)
    assert ref.gn.num_groups == half and ref.gn.num_channels == half and ref.gn.eps == 1e-5
