"""When simulated sites are online: a trace, or a diurnal model. Events are (simulated time, site index, up).

Every site is online when the run starts; an availability's events apply from then on (a site down at 0 goes
down at once). A site that goes down says bye: the broker declares it gone and its task is lost, as in
production; one that comes back says hello and may be given work again.

``Availability.trace(rows)`` takes rows ``(time_s, site, up)`` (site: an index or a name), or a CSV file with
the header ``time_s,site,up`` (up: 1/0, true/false). ``Availability.diurnal(period_s, online, seed)`` gives
each site a random phase and keeps it online for the ``online`` fraction of every period (phones on
chargers at night), up to ``until_s``.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedbus.errors import ConfigError

_TRUE = {"1", "true", "up", "yes", "on"}
_FALSE = {"0", "false", "down", "no", "off"}


@dataclass(frozen=True)
class Availability:
    """Sites coming and going (see the module docstring)."""

    kind: str
    rows: tuple[tuple[float, int | str, bool], ...] = ()
    period_s: float = 86400.0
    online: float = 0.5
    until_s: float = 7 * 86400.0
    seed: int = 0

    @classmethod
    def trace(cls, rows: Iterable[Sequence[object]] | str | os.PathLike[str]) -> Availability:
        if isinstance(rows, str | os.PathLike):
            rows = _read_csv(Path(rows))
        out: list[tuple[float, int | str, bool]] = []
        for n, row in enumerate(rows):
            if len(row) != 3:
                raise ConfigError(f"availability trace row {n}: expected (time_s, site, up), got {row!r}")
            t, site, up = row
            try:
                time_s = float(t)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise ConfigError(f"availability trace row {n}: time_s must be a number, got {t!r}") from None
            if not math.isfinite(time_s) or time_s < 0:
                raise ConfigError(f"availability trace row {n}: time_s must be finite and >= 0, got {t!r}")
            if not isinstance(site, int | str) or isinstance(site, bool):
                raise ConfigError(f"availability trace row {n}: site must be an index or a name, got {site!r}")
            out.append((time_s, site, _flag(up, n)))
        return cls("trace", tuple(out))

    @classmethod
    def diurnal(
        cls, period_s: float = 86400.0, online: float = 0.5, seed: int = 0, until_s: float = 7 * 86400.0
    ) -> Availability:
        if not (math.isfinite(period_s) and period_s > 0):
            raise ConfigError(f"Availability.diurnal: period_s must be > 0, got {period_s!r}")
        if not (0 < online <= 1):
            raise ConfigError(f"Availability.diurnal: online must be in (0, 1], got {online!r}")
        return cls("diurnal", period_s=float(period_s), online=float(online), until_s=float(until_s), seed=int(seed))

    def events(self, names: Sequence[str]) -> list[tuple[float, int, bool]]:
        """The events for sites ``names`` (index i is ``names[i]``), in time order."""
        if self.kind == "trace":
            index = {name: i for i, name in enumerate(names)}
            out = []
            for t, site, up in self.rows:
                i = index.get(site) if isinstance(site, str) else site
                if i is None or not 0 <= i < len(names):
                    raise ConfigError(f"availability trace names site {site!r}, which is not simulated")
                out.append((t, i, up))
            return sorted(out)
        if self.online >= 1:
            return []
        phases = np.random.default_rng(self.seed).uniform(0, self.period_s, len(names))
        on_s = self.online * self.period_s
        events: list[tuple[float, int, bool]] = []
        for i, phase in enumerate(phases):
            # online in [phase + k P, phase + k P + on_s) for every k: down at the end of each window, up at its start
            start = float(phase) - self.period_s
            while start < self.until_s:
                down = start + on_s
                if start >= 0:
                    events.append((start, i, True))
                if down >= 0 and down < self.until_s:
                    events.append((down, i, False))
                start += self.period_s
        return sorted(events)


def _flag(value: object, n: int) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"availability trace row {n}: up must be 1/0 or true/false, got {value!r}")


def _read_csv(path: Path) -> list[tuple[str, int | str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"time_s", "site", "up"} <= set(reader.fieldnames):
                raise ConfigError(f"{path}: an availability trace needs the header time_s,site,up")
            rows: list[tuple[str, int | str, str]] = []
            for row in reader:
                site = row["site"]
                rows.append((row["time_s"], int(site) if site.isdigit() else site, row["up"]))
            return rows
    except OSError as exc:
        raise ConfigError(f"cannot read availability trace {path}: {exc}") from exc
