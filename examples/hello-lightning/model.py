"""hello-lightning's model and data: a small LightningModule on scikit-learn's bundled 8x8 digits (no download).

Every site computes the same fixed, seeded 80/20 split of the 1,797 digits and keeps only its own shard
of each part (``DigitsData(site_index, num_sites)``), so no two sites see the same image.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class LitDigits(pl.LightningModule):
    """64 -> 32 -> 10 MLP with plain SGD (what SCAFFOLD's control update assumes); logs val_loss, val_acc and
    num_samples (to weigh sites in evaluations)."""

    def __init__(self, lr: float = 0.2) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.loss = nn.CrossEntropyLoss()
        self._seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss, batch_size=len(y))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._seen = 0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self._seen += len(y)
        self.log("val_loss", self.loss(logits, y), batch_size=len(y))
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean(), batch_size=len(y))

    def on_validation_epoch_end(self) -> None:
        self.log("num_samples", float(self._seen))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class DigitsData(pl.LightningDataModule):
    """Shard ``site_index`` of ``num_sites`` of the digits: its part of the training and of the held-out split."""

    def __init__(self, site_index: int = 0, num_sites: int = 1, batch_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        if not 0 <= site_index < num_sites:
            raise ValueError(f"site_index must be in [0, {num_sites}), got {site_index}")
        self.site_index, self.num_sites, self.batch_size, self.seed = site_index, num_sites, batch_size, seed

    def setup(self, stage: str | None = None) -> None:
        digits = load_digits()
        x = torch.tensor(digits.images / 16.0, dtype=torch.float32)
        y = torch.tensor(digits.target, dtype=torch.long)
        order = np.random.default_rng(self.seed).permutation(len(y))
        n_val = len(y) // 5
        train = np.array_split(order[n_val:], self.num_sites)[self.site_index]
        val = np.array_split(order[:n_val], self.num_sites)[self.site_index]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed + self.site_index)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)
