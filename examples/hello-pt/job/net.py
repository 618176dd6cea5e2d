"""The hello-pt model and data: a small CNN on scikit-learn's bundled 8x8 digits (no download).

Every site computes the same fixed 80/20 split of the 1,797 digits (same seed), then keeps only its own
shard of each part: the shards are disjoint, so no two sites train on the same image. The 20% held-out
part, whole, is the global test set (``heldout_loader``).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BATCH_SIZE = 8


class Net(nn.Module):
    """Two 3x3 conv layers (one max-pool) and two linear layers for 1x8x8 inputs, 10 classes (9,802 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, padding=1)  # 8x8x8 -> pool -> 8x4x4
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, padding=1)  # 16x4x4
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _split(seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """All digits as (N, 1, 8, 8) floats in [0, 1] with labels, and the fixed train / held-out indices."""
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = np.random.default_rng(seed).permutation(len(y))
    n_heldout = len(y) // 5
    return x, y, order[n_heldout:], order[:n_heldout]


def _loader(x: torch.Tensor, y: torch.Tensor, idx: np.ndarray, *, shuffle: bool, seed: int) -> DataLoader:
    ds = TensorDataset(x[idx], y[idx])
    return DataLoader(ds, batch_size=BATCH_SIZE, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def load_partition(site_index: int, num_sites: int, *, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """This site's (train_loader, test_loader): shard ``site_index`` of ``num_sites`` of each split."""
    if num_sites < 1 or not 0 <= site_index < num_sites:
        raise ValueError(f"site_index must be in [0, {num_sites}), got {site_index}")
    x, y, train_idx, heldout_idx = _split(seed)
    train_shard = np.array_split(train_idx, num_sites)[site_index]
    test_shard = np.array_split(heldout_idx, num_sites)[site_index]
    return (
        _loader(x, y, train_shard, shuffle=True, seed=seed + site_index),
        _loader(x, y, test_shard, shuffle=False, seed=seed),
    )


def heldout_loader(*, seed: int = 0) -> DataLoader:
    """The whole held-out 20%: the global test set, disjoint from every site's training shard."""
    x, y, _, heldout_idx = _split(seed)
    return _loader(x, y, heldout_idx, shuffle=False, seed=seed)


def evaluate(model: nn.Module, loader: DataLoader) -> float:
    """Accuracy of ``model`` on ``loader``, in [0, 1]."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    return correct / max(total, 1)
