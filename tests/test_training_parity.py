"""Training parity on real data: the reference and the fused SA-CNN learn scikit-learn's digits identically.

Both runs (examples/train_digits.py) start from the same weights and see the
same batches; only the Shuffle Attention implementation differs.
"""
import importlib.util
import pathlib

import pytest
import torch

pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install scikit-learn): it ships the digits")

_EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"
_spec = importlib.util.spec_from_file_location("train_digits", _EXAMPLE)
train_digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_digits)

EPOCHS = 6  # 132 SGD steps of 64 images
STEPS_PER_EPOCH = 22

# Tolerances, from runs over eight seeds (0-7; this test uses seed 0):
# * float32 fused vs float32 reference, per-step loss: at most 4.8e-7 apart during the first
#   epoch, at most 1.24e-3 (mean 1.1e-4) over the whole run. Seed 0 itself: 1.2e-7 throughout.
#   The later growth is float32 rounding amplified by SGD, not a defect: the float32 reference
#   drifts from its own float64 twin by up to 1.6e-3 (mean 1.6e-4) over the same runs.
# * float64 fused vs float64 reference: at most 1.2e-15 apart over the whole run; the two
#   compute the same function, so in float64 the curves coincide to rounding.
# * test accuracy: identical in every run (0.967 to 0.987 on the 397 held-out digits).
FIRST_EPOCH_ATOL = 1e-5
RUN_ATOL = 5e-3
RUN_MEAN_ATOL = 5e-4
FLOAT64_ATOL = 1e-12
MIN_ACCURACY = 0.95


@pytest.fixture(scope="module")
def float32_runs():
    return train_digits.paired_runs(epochs=EPOCHS, seed=0)


def test_float32_loss_curves_agree(float32_runs):
    (ref_losses, _), (fused_losses, _) = float32_runs["reference"], float32_runs["fused"]
    assert len(ref_losses) == len(fused_losses) == EPOCHS * STEPS_PER_EPOCH
    diff = (ref_losses - fused_losses).abs()
    assert diff[:STEPS_PER_EPOCH].max() <= FIRST_EPOCH_ATOL, diff[:STEPS_PER_EPOCH]
    assert diff.max() <= RUN_ATOL, f"max loss difference {diff.max():.3e} at step {diff.argmax()}"
    assert diff.mean() <= RUN_MEAN_ATOL, f"mean loss difference {diff.mean():.3e}"


def test_float32_both_learn_to_the_same_accuracy(float32_runs):
    (ref_losses, ref_acc), (fused_losses, fused_acc) = float32_runs["reference"], float32_runs["fused"]
    for losses in (ref_losses, fused_losses):
        assert losses[:3].mean() > 2.0 and losses[-STEPS_PER_EPOCH:].mean() < 0.15, "did not learn"
    assert ref_acc >= MIN_ACCURACY and fused_acc >= MIN_ACCURACY, (ref_acc, fused_acc)
    # At most one of the 397 held-out digits may flip (none did in any measured run).
    assert abs(ref_acc - fused_acc) <= 1.5 / 397, (ref_acc, fused_acc)


def test_float64_loss_curves_coincide():
    runs = train_digits.paired_runs(epochs=EPOCHS, seed=0, dtype=torch.float64)
    (ref_losses, ref_acc), (fused_losses, fused_acc) = runs["reference"], runs["fused"]
    diff = (ref_losses - fused_losses).abs()
    assert diff.max() <= FLOAT64_ATOL, f"max loss difference {diff.max():.3e} at step {diff.argmax()}"
    assert ref_acc == fused_acc >= MIN_ACCURACY
