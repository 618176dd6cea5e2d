"""A job's secure-aggregation settings: ``secure_aggregation = {threshold = 3, clip = 8.0, ...}``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fedbus.errors import ConfigError

KEYS = ("threshold", "clip", "bits", "max_weight")


@dataclass(frozen=True)
class SecAggConfig:
    """``threshold``: masked inputs (and share holders) a round needs; fewer, and it fails without revealing a
    sum. ``clip``: values are clipped to [-clip, clip] before encoding. ``bits``: the ring, 32 or 64.
    ``max_weight``: FedAvg's weights (sample counts) capped at it and sent masked; None: equal weights."""

    threshold: int
    clip: float = 8.0
    bits: int = 32
    max_weight: float | None = None

    @classmethod
    def parse(cls, value: Any, where: str = "secure_aggregation") -> SecAggConfig:
        """The settings of a job option; ConfigError names the key that cannot be used."""
        if isinstance(value, SecAggConfig):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table such as {{threshold = 3, clip = 8.0}}, got {value!r}")
        unknown = sorted(set(value) - set(KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown} (known: {', '.join(KEYS)})")
        if "threshold" not in value:
            raise ConfigError(f"{where}: threshold is required (the masked inputs a round needs, >= 2)")
        t = value["threshold"]
        if not isinstance(t, int) or isinstance(t, bool) or t < 2:
            raise ConfigError(f"{where}.threshold must be an integer >= 2, got {t!r}")
        clip = value.get("clip", 8.0)
        if not isinstance(clip, int | float) or isinstance(clip, bool) or not (0 < clip < math.inf):
            raise ConfigError(f"{where}.clip must be a number > 0, got {clip!r}")
        bits = value.get("bits", 32)
        if bits not in (32, 64) or isinstance(bits, bool):
            raise ConfigError(f"{where}.bits must be 32 or 64, got {bits!r}")
        mw = value.get("max_weight")
        if mw is not None and (not isinstance(mw, int | float) or isinstance(mw, bool) or not (0 < mw < math.inf)):
            raise ConfigError(f"{where}.max_weight must be a number > 0, got {mw!r}")
        return cls(t, float(clip), int(bits), None if mw is None else float(mw))

    def to_dict(self) -> dict[str, Any]:
        """Plain values (what tasks carry to the sites); ``max_weight`` left out when unset."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def ratio(self, weight: float) -> float:
        """A site's weight as it enters the masked sum: in [0, 1] (see ``fedbus.secagg.encoding``)."""
        if self.max_weight is None:
            return 1.0
        return min(max(float(weight), 0.0), self.max_weight) / self.max_weight
