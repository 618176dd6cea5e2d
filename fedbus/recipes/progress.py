"""Showing a run while it executes: a live bar on a terminal, log lines elsewhere, or the caller's callback.

Why reporters run in the caller's thread: ``Run.wait()`` takes each new snapshot from the environment's
background loop and hands it to the reporter from the thread that waits. A callback may therefore raise
(a KeyboardInterrupt included) exactly where the caller can catch it, and the wait aborts the job and
stops the environment on the way out, instead of an exception dying silently in a background thread.

``progress`` of an environment: ``None`` (the default) picks a tqdm bar when stderr is a terminal and
structlog lines otherwise; ``False`` is silent; a callable gets every :class:`Progress`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedbus.log import get_logger


@dataclass(frozen=True)
class Progress:
    """A snapshot of a running job, as the broker's status reports it."""

    job_id: str
    state: str
    version: int
    total: int | None
    sites: int
    reporting: int
    busy: int
    elapsed_s: float
    metrics: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_status(cls, job: Mapping[str, Any], total: int | None, elapsed_s: float) -> Progress:
        """Build from one entry of the broker's status reply (``live`` is there while the job runs)."""
        live = job.get("live") or {}
        strategy = live.get("strategy") or {}
        reporting = strategy.get("round_accepted", strategy.get("buffered", 0))
        return cls(
            job_id=str(job["id"]),
            state=str(job["state"]),
            version=int(live.get("version", job.get("version", 0)) or 0),
            total=total,
            sites=len(job.get("sites") or []),
            reporting=int(reporting or 0),
            busy=int(live.get("tasks_in_flight", 0) or 0),
            elapsed_s=elapsed_s,
            metrics=dict(job.get("last_metrics") or {}),
        )

    def short_metrics(self, limit: int = 3) -> dict[str, str]:
        """The first few model metrics (strategy counters left out), formatted for a bar or a log line."""
        out = {}
        for k, v in self.metrics.items():
            if "/" in k or not isinstance(v, int | float) or isinstance(v, bool):
                continue
            out[k] = f"{v:.4g}"
            if len(out) == limit:
                break
        return out


class Reporter(Protocol):
    def update(self, p: Progress) -> None: ...

    def close(self) -> None: ...


class _Callback:
    def __init__(self, fn: Callable[[Progress], Any]) -> None:
        self.fn = fn

    def update(self, p: Progress) -> None:
        self.fn(p)

    def close(self) -> None:
        pass


class _LogLines:
    """One structlog line whenever the state or the version changes (CI logs, files, pipes)."""

    def __init__(self) -> None:
        self.log = get_logger("recipes.progress")
        self.last: tuple[str, int] | None = None

    def update(self, p: Progress) -> None:
        key = (p.state, p.version)
        if key != self.last:
            self.last = key
            self.log.info(
                "job progress", job_id=p.job_id, state=p.state, version=p.version, total=p.total, **p.short_metrics()
            )

    def close(self) -> None:
        pass


class _Bar:
    """A tqdm bar over global versions: ``version/total``, sites reporting, the latest metrics."""

    def __init__(self) -> None:
        self.bar: Any = None

    def update(self, p: Progress) -> None:
        from tqdm import tqdm  # the examples extra; only a terminal needs it

        if self.bar is None:
            self.bar = tqdm(total=p.total, desc=p.job_id, unit="version", file=sys.stderr, leave=True)
        self.bar.n = p.version
        self.bar.set_postfix(state=p.state, sites=f"{p.reporting}/{p.sites}", **p.short_metrics(), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def make_reporter(progress: bool | Callable[[Progress], Any] | None) -> Reporter | None:
    """The reporter an environment's ``progress`` argument asks for (None: nothing to show)."""
    if progress is False:
        return None
    if callable(progress):
        return _Callback(progress)
    if progress is None or progress is True:
        try:
            terminal = sys.stderr.isatty()
        except (AttributeError, ValueError):
            terminal = False
        if terminal:
            try:
                import tqdm  # noqa: F401
            except ImportError:
                return _LogLines()
            return _Bar()
        return _LogLines()
    raise TypeError(f"progress must be None, a bool or a callable, not {type(progress).__name__}")
