"""Train a small SA-CNN on scikit-learn's handwritten digits, with the reference and the fused Shuffle Attention.

Both runs start from the same weights and see the same batches in the same
order, so their loss curves should agree to float32 rounding:

    PYTHONPATH=. python examples/train_digits.py --epochs 6

The digits (1797 8x8 images, 10 classes) ship inside scikit-learn: no download.
"""
import argparse
import time

import torch
from torch import nn

import sa_kernels


class DigitsSANet(nn.Module):
    """conv 3x3 -> ReLU -> conv 3x3 -> Shuffle Attention -> ReLU -> max-pool -> linear."""

    def __init__(self, fused, channels=64, groups=4, backend="torch"):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, channels, 3, padding=1)
        if fused:
            self.sa = sa_kernels.FusedShuffleAttention(channels, G=groups, backend=backend)
        else:
            self.sa = sa_kernels.ShuffleAttention(channels, G=groups)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(channels * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.sa(self.conv2(x))))
        return self.head(x.flatten(1))


def load_digits_split(n_train=1400, seed=0):
    """(x_train, y_train, x_test, y_test): images scaled to [0, 1], shape (N, 1, 8, 8), a fixed random split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def train(model, data, epochs=6, batch_size=64, lr=0.05, seed=0):
    """SGD with momentum; returns (per-step training losses, test accuracy). Batch order depends on ``seed`` only."""
    x_train, y_train, x_test, y_test = data
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    batches = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y_train), generator=batches).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return torch.tensor(losses, dtype=torch.float64), accuracy


def paired_runs(epochs=6, seed=0, dtype=torch.float32):
    """Train the reference and the fused model from the same initial weights on the same batches."""
    data = [t.to(dtype) if t.is_floating_point() else t for t in load_digits_split(seed=seed)]
    torch.manual_seed(seed)
    reference = DigitsSANet(fused=False).to(dtype)
    fused = DigitsSANet(fused=True).to(dtype)
    fused.load_state_dict(reference.state_dict())
    return {name: train(model, data, epochs=epochs, seed=seed)
            for name, model in (("reference", reference), ("fused", fused))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    runs = paired_runs(args.epochs, args.seed)
    (ref_losses, ref_acc), (fused_losses, fused_acc) = runs["reference"], runs["fused"]
    print(f"{len(ref_losses)} steps in {time.perf_counter() - start:.1f} s")
    for step in range(0, len(ref_losses), max(1, len(ref_losses) // 10)):
        print(f"step {step:4d}  loss reference {ref_losses[step]:.6f}  fused {fused_losses[step]:.6f}")
    print(f"max |loss difference| over the run: {(ref_losses - fused_losses).abs().max():.2e}")
    print(f"test accuracy: reference {ref_acc:.4f}, fused {fused_acc:.4f}")


if __name__ == "__main__":
    main()
