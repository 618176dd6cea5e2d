"""The experiment's model: an MLP for the 64 pixels of a digit, small enough to train in milliseconds.

Speed matters more than the last point of accuracy here: twenty sites share two CPU cores, and the
experiment compares how fast two strategies *schedule* training, not how good one model can get.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

IN_FEATURES = 64
HIDDEN = 64
CLASSES = 10


class MLP(nn.Module):
    """64 -> 64 (ReLU) -> 10: 4,810 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def make_model(seed: int) -> MLP:
    """A freshly initialised MLP; the same seed gives the same weights (both strategies start from it)."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return MLP()
    finally:
        torch.random.set_rng_state(gen_state)


def evaluate(model: nn.Module | Mapping[str, torch.Tensor], x: np.ndarray | torch.Tensor, y: np.ndarray) -> float:
    """Accuracy in [0, 1] of a model, or of a state_dict loaded into an MLP, on (x, y)."""
    if not isinstance(model, nn.Module):
        state = model
        model = MLP()
        model.load_state_dict(dict(state))
    model.eval()
    xs = torch.as_tensor(np.asarray(x, dtype=np.float32))
    ys = torch.as_tensor(np.asarray(y, dtype=np.int64))
    with torch.no_grad():
        return float((model(xs).argmax(dim=1) == ys).float().mean()) if len(ys) else 0.0


def warm_up() -> None:
    """One optimizer step on throwaway data, so torch's lazy imports (torch._dynamo, ~2 s, on the first
    ``optimizer.step()`` of the process) happen before any clock starts: otherwise the first strategy
    to run would pay them inside its first round, stretched further by the sites' slowdown factors."""
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    nn.functional.cross_entropy(model(torch.zeros(2, IN_FEATURES)), torch.zeros(2, dtype=torch.long)).backward()
    optimizer.step()
