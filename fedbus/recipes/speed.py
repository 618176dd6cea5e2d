"""Simulated site speeds: a slowdown factor per site, drawn once, so a simulation shows stragglers.

Why hold results back instead of slowing training down: the simulator's sites share the caller's cores,
so their real training times say little about a federation of separate machines. Each site ``i`` gets a
factor ``f_i``; the site measures how long its script trained on a task (``t``) and holds the result back
for ``(f_i - 1) x t`` (never negative), so the task takes ``f_i x t`` from the broker's point of view.
A factor below 1 cannot make training faster than it was: such a site simply adds no delay.

Draws are seeded and made for sites in order, so site ``i`` gets the same factor in every run with the
same seed, whatever the number of sites after it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedbus.errors import ConfigError


@dataclass(frozen=True)
class SpeedProfile:
    """How slow each simulated site is; build one with ``fixed``, ``lognormal`` or ``exponential``."""

    kind: str
    values: tuple[float, ...] = ()
    sigma: float = 1.0
    mean: float = 1.0
    seed: int = 0

    @classmethod
    def fixed(cls, factors: Sequence[float]) -> SpeedProfile:
        """Site ``i`` gets ``factors[i]`` (e.g. ``[1, 1, 4]``: the third site takes four times as long)."""
        values = tuple(float(f) for f in factors)
        if not values or not all(math.isfinite(f) and f > 0 for f in values):
            raise ConfigError(f"SpeedProfile.fixed: factors must be finite numbers > 0, got {list(factors)!r}")
        return cls("fixed", values)

    @classmethod
    def lognormal(cls, sigma: float = 1.0, seed: int = 0) -> SpeedProfile:
        """``f_i = exp(sigma x z_i)``, ``z_i`` standard normal: median 1, a long tail of slow sites."""
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ConfigError(f"SpeedProfile.lognormal: sigma must be a finite number >= 0, got {sigma!r}")
        return cls("lognormal", sigma=float(sigma), seed=int(seed))

    @classmethod
    def exponential(cls, mean: float = 1.0, seed: int = 0) -> SpeedProfile:
        """``f_i`` exponentially distributed with the given mean."""
        if not (math.isfinite(mean) and mean > 0):
            raise ConfigError(f"SpeedProfile.exponential: mean must be a finite number > 0, got {mean!r}")
        return cls("exponential", mean=float(mean), seed=int(seed))

    def factors(self, n: int) -> list[float]:
        """The factors of sites 0 .. n-1."""
        if self.kind == "fixed":
            if len(self.values) < n:
                raise ConfigError(f"SpeedProfile.fixed has {len(self.values)} factors for {n} sites")
            return list(self.values[:n])
        rng = np.random.default_rng(self.seed)
        if self.kind == "lognormal":
            return [float(math.exp(self.sigma * z)) for z in rng.standard_normal(n)]
        if self.kind == "exponential":
            return [float(x) for x in rng.exponential(self.mean, n)]
        raise ConfigError(f"unknown speed profile {self.kind!r}")
