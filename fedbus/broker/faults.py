"""Storage faults of the broker's workspace: what is failing, since when, and when to try again.

Theory of operation. A write to the workspace that fails (a full disk, an I/O error, a file system gone
read-only) is not the end of what was being written: the writer keeps it (in memory, or where it lies on the
spool) and tries again later. While it does, the fault is registered here under a key naming the writer
(``"store"`` for the SQLite store, ``"checkpoint:JOB"`` for a job's checkpoint chain), with the path and errno
of the failure. What reads it: a job's status (a job with a fault of its own, or any while the store is
failing, is paused, with the fault as the reason), ``/healthz`` (unhealthy while any fault is registered) and the
metrics. A writer whose retry succeeds clears its key.

``Backoff`` is the retry schedule: short first (a disk freed within the second costs little), doubling up to a
cap, so that a workspace broken for long is probed every few seconds, not in a busy loop. Pure: no clock reads,
no sleeping; the caller sleeps ``next()`` seconds and passes ``now`` where a time is recorded.
"""

from __future__ import annotations

import errno as errnos
import sqlite3
from dataclasses import dataclass, replace

FIRST_RETRY_S = 0.05
RETRY_CAP_S = 2.0
"""The longest wait between two attempts: how long a recovered disk may wait before its writes resume."""

STORE = "store"
"""The key of the SQLite store's fault (it holds every job's rows: all running jobs pause)."""

# SQLite's primary result codes for the failures a disk causes, as the errno the kernel gave the write.
_SQLITE_ERRNO = {
    "SQLITE_FULL": errnos.ENOSPC,
    "SQLITE_IOERR": errnos.EIO,
    "SQLITE_READONLY": errnos.EROFS,
    "SQLITE_CANTOPEN": errnos.EACCES,
}


def checkpoint_key(job_id: str) -> str:
    return f"checkpoint:{job_id}"


class Backoff:
    """Delays between attempts: ``first``, then doubled each time, at most ``cap``; ``reset`` after a success."""

    def __init__(self, first: float = FIRST_RETRY_S, cap: float = RETRY_CAP_S, factor: float = 2.0) -> None:
        if not 0 < first <= cap or factor < 1:
            raise ValueError(f"backoff needs 0 < first <= cap and factor >= 1, got {first}, {cap}, {factor}")
        self.first, self.cap, self.factor = first, cap, factor
        self.attempts = 0

    def next(self) -> float:
        """The delay before the next attempt (counts it)."""
        delay = min(self.cap, self.first * self.factor**self.attempts)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0


@dataclass(frozen=True)
class Fault:
    """A write that failed and is being retried: ``what`` was written where (``path``), the ``errno`` the system
    gave (None when unknown), the error's text, the job it holds up (None: every job), when it first failed
    (``since``, wall-clock seconds) and how many attempts failed."""

    what: str
    path: str
    errno: int | None
    error: str
    job_id: str | None
    since: float
    attempts: int = 1

    @property
    def errno_name(self) -> str:
        return errnos.errorcode.get(self.errno, "") if self.errno is not None else ""

    def describe(self, now: float) -> str:
        """One line for status, the log and ``/healthz``."""
        code = f" ({self.errno_name})" if self.errno_name else ""
        tries = f"{self.attempts} attempt{'s' if self.attempts != 1 else ''}"
        return (
            f"workspace write failing: {self.what} at {self.path}: {self.error}{code}; "
            f"for {max(0.0, now - self.since):.1f} s, {tries}, retrying"
        )


def errno_of(exc: BaseException) -> int | None:
    """The errno behind a failed write: an ``OSError``'s own, a SQLite error's result code mapped to the errno
    the kernel gave SQLite's write (``SQLITE_FULL`` -> ENOSPC ...), else that of an ``OSError`` it was raised
    from."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", "") or ""
        for prefix, code in _SQLITE_ERRNO.items():
            if name.startswith(prefix):
                return code
        text = str(exc).lower()
        if "disk is full" in text:
            return errnos.ENOSPC
        if "readonly" in text or "read-only" in text:
            return errnos.EROFS
        if "disk i/o error" in text:
            return errnos.EIO
    cause = exc.__cause__ or exc.__context__
    return errno_of(cause) if cause is not None and cause is not exc else None


class Faults:
    """The faults registered now, by key (see the module's doc)."""

    def __init__(self) -> None:
        self._faults: dict[str, Fault] = {}
        self.failures = 0  # failed attempts ever (a counter for the metrics)

    def failed(self, key: str, what: str, path: str, exc: BaseException, job_id: str | None, now: float) -> Fault:
        """Register a failed attempt under ``key``: a new fault, or one more attempt of the one there."""
        self.failures += 1
        known = self._faults.get(key)
        error = _short_error(exc)
        if known is None:
            fault = Fault(what, path, errno_of(exc), error, job_id, now)
        else:
            fault = replace(known, what=what, path=path, errno=errno_of(exc), error=error, attempts=known.attempts + 1)
        self._faults[key] = fault
        return fault

    def cleared(self, key: str) -> Fault | None:
        """The write under ``key`` succeeded: its fault (if any) is over; returns it."""
        return self._faults.pop(key, None)

    def get(self, key: str) -> Fault | None:
        return self._faults.get(key)

    def active(self) -> list[Fault]:
        return list(self._faults.values())

    def holding(self, job_id: str) -> Fault | None:
        """What pauses ``job_id``: its own fault first, else the store's (every job's rows wait for it)."""
        own = next((f for f in self._faults.values() if f.job_id == job_id), None)
        return own or self._faults.get(STORE)

    def __bool__(self) -> bool:
        return bool(self._faults)


def _short_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)[:200] or type(exc).__name__
