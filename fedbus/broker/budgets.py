"""Byte budgets of what sites make the broker store for a job: its events, metrics records and script output.

Pure accounting: no IO, no clock reads (``now`` is passed in), no logging. ``fedbus.broker.store_gate`` asks it
about every ``job_event`` before anything is written, and does the telling and the logging.

Theory of operation. Stored bytes come in classes (``EVENTS``: the rows of ``job_event`` messages in SQLite,
``log`` metrics records among them, which the job's tracking stores also take; ``LOGS``: script output lines
appended to ``<job>/logs/<site>.log``). Each class has two budgets, ``Limits.per_site`` (what one site may add to
one job) and ``Limits.per_job`` (all its sites together), and every record has a size cap (``max_record``). A
record is charged to both budgets when it fits both and the cap, else it is refused and charges nothing: what a
job's store holds of a class never passes ``per_job``, whatever its sites send. The store's growth is thus
bounded by the broker's profile, per job.

Refusals are reported sparingly: the first refusal of a site's records of a class in a job says ``tell`` (the
site hears why, once); the first of a burst says ``log`` with the count of refusals since the previous logged
one, and a burst ends after ``burst_s`` without a logged refusal, so a flood costs one log line and one audit
record per ``burst_s``, not one per message.

Budgets start from what a job already holds (``seed``): a broker restarted on its workspace does not give a
site its budget again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

EVENTS = "events"
LOGS = "logs"
CLASSES = (EVENTS, LOGS)


@dataclass(frozen=True)
class Limits:
    """One class's budgets, in bytes: per site in a job, and per job (its sites together)."""

    per_site: int
    per_job: int


@dataclass(frozen=True)
class Refusal:
    """A record refused: why; whether the site is to hear it (the first of its kind); whether to log it (the
    first of a burst), and how many were refused since the last logged refusal (this one included)."""

    reason: str
    tell: bool
    log: bool
    count: int


@dataclass
class _Burst:
    logged_at: float
    count: int = 0


class ByteBudgets:
    """Bytes charged per (job, site, class) and per (job, class), against ``limits`` by class."""

    def __init__(self, limits: Mapping[str, Limits], max_record: int, burst_s: float = 10.0) -> None:
        unknown = set(limits) - set(CLASSES)
        if unknown:
            raise ValueError(f"unknown byte budget classes: {sorted(unknown)}")
        if max_record <= 0 or burst_s <= 0:
            raise ValueError("max_record and burst_s must be positive")
        self.limits = dict(limits)
        self.max_record = max_record
        self.burst_s = burst_s
        self._site: dict[tuple[str, str, str], int] = {}  # (job, site, class) -> bytes charged
        self._job: dict[tuple[str, str], int] = {}  # (job, class) -> bytes charged
        self._seeded: set[str] = set()
        self._told: set[tuple[str, str, str]] = set()  # (job, site, class) refused once already
        self._bursts: dict[tuple[str, str], _Burst] = {}  # (job, site) -> its refusals since the last logged

    # --- what a job holds already -------------------------------------------------------------------------

    def seeded(self, job: str) -> bool:
        return job in self._seeded

    def seed(self, job: str, kind: str, by_site: Mapping[str, int]) -> None:
        """Start the job's ``kind`` budgets from the bytes its store holds already, by site."""
        self._seeded.add(job)
        for site, size in by_site.items():
            self._add(job, site, kind, max(0, int(size)))

    def used(self, job: str, kind: str, site: str | None = None) -> int:
        """Bytes charged to the job (or to one of its sites) in class ``kind``."""
        if site is None:
            return self._job.get((job, kind), 0)
        return self._site.get((job, site, kind), 0)

    # --- charging -------------------------------------------------------------------------------------------

    def fits(self, job: str, site: str, kind: str, size: int) -> bool:
        """Whether a record of ``size`` bytes would be charged (a caller with a cheap lower bound of a record's
        size learns from it that an exact sizing is not needed: the record is refused either way)."""
        return self._over(job, site, kind, size) is None

    def _over(self, job: str, site: str, kind: str, size: int) -> str | None:
        limits = self.limits[kind]
        if size > self.max_record:
            return f"a {kind} record of {size} bytes or more is over the broker's cap of {self.max_record} bytes"
        if self.used(job, kind, site) + size > limits.per_site:
            return f"site {site!r} is over its {kind} budget of {limits.per_site} bytes in job {job!r}"
        if self.used(job, kind) + size > limits.per_job:
            return f"job {job!r} is over its {kind} budget of {limits.per_job} bytes (all its sites)"
        return None

    def charge(self, job: str, site: str, kind: str, size: int, now: float) -> Refusal | None:
        """Charge a record of ``size`` bytes, or refuse it (None: charged, store it)."""
        reason = self._over(job, site, kind, size)
        if reason is None:
            self._add(job, site, kind, size)
            return None
        return self._refuse(job, site, kind, reason, now)

    def _add(self, job: str, site: str, kind: str, size: int) -> None:
        self._site[(job, site, kind)] = self._site.get((job, site, kind), 0) + size
        self._job[(job, kind)] = self._job.get((job, kind), 0) + size

    def _refuse(self, job: str, site: str, kind: str, reason: str, now: float) -> Refusal:
        tell = (job, site, kind) not in self._told
        self._told.add((job, site, kind))
        burst = self._bursts.get((job, site))
        if burst is not None and now - burst.logged_at < self.burst_s and not tell:
            burst.count += 1
            return Refusal(reason, tell=False, log=False, count=burst.count)
        count = 1 + (burst.count if burst is not None else 0)
        self._bursts[(job, site)] = _Burst(logged_at=now)
        return Refusal(reason, tell=tell, log=True, count=count)
