"""The arithmetic of aggregation as plain functions (Flower's ``aggregate.py`` idea, without its copies).

Everything folds into ONE accumulator as results arrive, so the broker's memory stays O(model) however
many sites report: ``weighted_sum_into`` adds ``weight * tensor`` in place, ``finalize_mean`` divides.
Floating tensors accumulate in their own dtype (no upcast: the accumulator costs exactly one model).

Non-floating tensors (integer counters such as BatchNorm's ``num_batches_tracked``, bool masks) cannot be
averaged. The rule here, chosen because it is order-independent (so results do not depend on which site
answered first) and right for monotone counters: ``integers="max"`` keeps the elementwise maximum of
the values seen (for bool: logical or); ``integers="skip"`` leaves them out of the accumulator, so the
caller keeps the global model's value (used for deltas, where "max of a delta" means nothing).

The staleness functions follow FedAsync (Xie et al., 2019, "Asynchronous Federated Optimization"):
they scale an update trained ``s`` versions ago.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Literal

import torch

from fedbus.errors import ConfigError, StrategyError

IntegerRule = Literal["max", "skip"]
StalenessFn = Callable[[int], float]


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


@torch.no_grad()
def weighted_sum_into(
    acc: dict[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    weight: float,
    *,
    integers: IntegerRule = "max",
) -> None:
    """Fold ``weight * params`` into ``acc`` in place; ``params`` is only read.

    A missing key is created on first use (``acc`` may start empty), so the caller needs no reference
    model to build the accumulator. Non-floating tensors follow ``integers`` (module docstring).
    """
    for name, t in params.items():
        cur = acc.get(name)
        if _is_float(t):
            if cur is None:
                acc[name] = torch.mul(t, weight)
            else:
                cur.add_(t, alpha=weight)
        elif integers == "max":
            if cur is None:
                acc[name] = t.clone()
            else:
                torch.maximum(cur, t, out=cur)


@torch.no_grad()
def finalize_mean(acc: dict[str, torch.Tensor], total_weight: float) -> dict[str, torch.Tensor]:
    """Turn a weighted sum into a weighted mean in place (floating tensors only) and return ``acc``."""
    if not total_weight > 0 or not math.isfinite(total_weight):
        raise StrategyError(f"cannot average with total weight {total_weight!r}")
    for t in acc.values():
        if _is_float(t):
            t.div_(total_weight)
    return acc


class MetricMean:
    """Weighted mean of each metric key over the updates that reported it (keys may differ by site)."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    def add(self, metrics: Mapping[str, float], weight: float) -> None:
        """Fold one update's metrics; values must already be finite floats (see ``clean_metrics``)."""
        for k, v in metrics.items():
            self._sums[k] = self._sums.get(k, 0.0) + weight * v
            self._weights[k] = self._weights.get(k, 0.0) + weight

    def result(self) -> dict[str, float]:
        """The mean of every key seen so far."""
        return {k: s / self._weights[k] for k, s in self._sums.items()}


def constant(s: int) -> float:
    """Every update counts fully, however stale."""
    return 1.0


def polynomial(s: int, a: float = 0.5) -> float:
    """``(1 + s) ** -a``: FedBuff's default with a = 0.5 (1 / sqrt(1 + s))."""
    return float((1.0 + s) ** -a)


def hinge(s: int, a: float = 10.0, b: float = 4.0) -> float:
    """Full weight up to ``b`` versions late, then ``1 / (a (s - b) + 1)`` (FedAsync's hinge)."""
    return 1.0 if s <= b else 1.0 / (a * (s - b) + 1.0)


STALENESS_FUNCTIONS: dict[str, Callable[..., float]] = {
    "constant": constant,
    "polynomial": polynomial,
    "hinge": hinge,
}


def make_staleness_fn(name: str, **kw: float) -> StalenessFn:
    """Resolve a staleness function by name with its parameters (``a``, ``b``), checked up front.

    Raises ConfigError naming the unknown function or argument, or the invalid value, so a typo in a
    job config fails at submission rather than after hours of training.
    """
    fn = STALENESS_FUNCTIONS.get(name)
    if fn is None:
        raise ConfigError(f"unknown staleness function {name!r}; known: {', '.join(sorted(STALENESS_FUNCTIONS))}")
    allowed = [p for p in inspect.signature(fn).parameters if p != "s"]
    for key, value in kw.items():
        if key not in allowed:
            raise ConfigError(f"staleness function {name!r} takes no argument {key!r}; it accepts: {allowed or 'none'}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"staleness argument {key!r} must be a finite number >= 0, got {value!r}")
    return functools.partial(fn, **{k: float(v) for k, v in kw.items()})
