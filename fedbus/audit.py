"""The audit trail: an append-only JSON-lines file per daemon, ``WORKSPACE/audit.jsonl``.

Why a file of its own and not the log: logs rotate, change level and carry debugging noise; the audit
trail is for a compliance officer reconstructing what left each site. Every record is one line written
with a single ``write`` on an ``O_APPEND`` descriptor (lines never interleave, and the file is only ever
appended to), mode 0600. A site opens the file per record: its records are few, and a simulation with a
thousand sites in one process should not hold a thousand descriptors. The broker holds its descriptor
(``hold``): it writes two records per update, and opening the file for each would be a measurable share of its
loop at hundreds of updates a second; once a second it checks the path still names that file (moved or deleted by
an operator: a new one is opened). A held file's records are written once per turn of the event loop (``flush``).

Fields are flat: ``time`` (UTC, ISO 8601), ``ts`` (epoch seconds), ``actor`` (the daemon writing: ``broker``
or the site's name), ``kind``, then what applies of ``job``, ``task``, ``site``, ``by`` (the participant
acting), ``key`` (its public key, CURVE only), ``version``, ``size``, ``digest`` and ``reason``.

Kinds: ``connection_refused``, ``refused`` (a message or request), ``hello``, ``revoked``,
``job_submitted``, ``job_aborted``, ``job_downloaded``, ``job_deployed``, ``job_dropped`` (a site ended a job
the broker told it does not run there: ``cause`` ``unknown`` or ``ended``, and ``reason``), ``task_sent`` /
``task_received``, ``update_sent`` / ``update_received`` (same ``digest`` on both sides: the stream's
verified whole-stream digest), ``update_failed``, and at a site with a privacy budget ``privacy_spent`` (one
release of its DP filter: ``epsilon`` spent on the job so far, ``delta``, ``releases``, ``max_epsilon``,
``accountant``) and ``privacy_refused`` (an update held back: the budget would be exceeded, with ``reason``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedbus.errors import ConfigError

MAX_FIELD = 2000


class AuditLog:
    """Appends audit records to one file; safe from several threads and processes (one write per line)."""

    def __init__(self, path: str | os.PathLike[str], actor: str, *, hold: bool = False) -> None:
        self.path = Path(path)
        self.actor = actor
        self.closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._pending: list[bytes] | None = None  # a held file's records of this turn of the event loop
        self._unwritten = b""  # records a failed write left (a full disk), written before the next ones
        self._fd = self._open()  # the file exists from the start
        self._checked = time.monotonic()
        if not hold:
            os.close(self._fd)
            self._fd = -1

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _held(self) -> int:
        """The held descriptor, opened again if the path no longer names its file (checked once a second)."""
        now = time.monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            try:
                same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
            except OSError:
                same = False
            if not same:
                os.close(self._fd)
                self._fd = self._open()
        return self._fd

    def record(self, kind: str, **fields: Any) -> None:
        """Append one record; None fields are left out, long strings cut."""
        now = time.time()
        rec: dict[str, Any] = {
            "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
            "ts": round(now, 6),
            "actor": self.actor,
            "kind": kind,
        }
        for k, v in fields.items():
            if v is None:
                continue
            rec[k] = v[:MAX_FIELD] if isinstance(v, str) else v
        line = (json.dumps(rec, default=str, ensure_ascii=True) + "\n").encode()
        if self.closed:
            return
        if self._fd >= 0:
            if self._pending is None:
                try:
                    asyncio.get_running_loop().call_soon(self.flush)
                except RuntimeError:  # no event loop in this thread: at once
                    os.write(self._held(), line)
                    return
                self._pending = []
            self._pending.append(line)
            return
        fd = self._open()
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def flush(self) -> None:
        """Write the records of this turn of the event loop, in one ``write``. The broker writes two records
        per update, and a system call for each would be a measurable share of its loop at hundreds of updates a
        second. The broker calls this before a reply or an error leaves, so that what a peer is told about
        is in the trail when it hears of it."""
        pending, self._pending = self._pending, None
        if (pending or self._unwritten) and self._fd >= 0:
            data = self._unwritten + b"".join(pending or ())
            try:  # a full or failing disk: what was not written waits for the next flush, in order
                self._unwritten = data[os.write(self._held(), data) :]
            except OSError:
                self._unwritten = data

    def close(self) -> None:
        """Later records are dropped (the daemon has stopped)."""
        self.flush()
        self.closed = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_audit(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The records of an audit file, in order; a torn last line (a crash mid-write) is skipped."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - a generator: closed by the with below
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the audit log: {exc.strerror or exc}") from exc
    with f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


def select(
    records: Iterable[dict[str, Any]], *, job: str | None = None, site: str | None = None, kind: str | None = None
) -> list[dict[str, Any]]:
    """Records about ``job``, involving ``site`` (as the site acted on, or as the actor), of ``kind``."""
    out = []
    for rec in records:
        if job is not None and rec.get("job") != job:
            continue
        if site is not None and site not in (rec.get("site"), rec.get("actor"), rec.get("by")):
            continue
        if kind is not None and rec.get("kind") != kind:
            continue
        out.append(rec)
    return out


_COLUMNS = ("job", "task", "site", "by", "version", "size", "digest", "epsilon", "delta", "reason")


def format_table(records: Iterable[dict[str, Any]]) -> str:
    """One line per record: time, actor, kind, then the fields it has."""
    lines = []
    for rec in records:
        rest = " ".join(f"{k}={rec[k]}" for k in _COLUMNS if k in rec)
        lines.append(f"{rec.get('time', '?'):<29} {rec.get('actor', '?'):<14} {rec.get('kind', '?'):<18} {rest}")
    return "\n".join(lines)


def privacy_spent(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (job, site): the epsilon spent (the last ``privacy_spent`` record's: the ledger's total), for which
    delta, in how many releases, the budget, and how many updates were refused for it."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in records:
        if rec.get("kind") not in ("privacy_spent", "privacy_refused"):
            continue
        key = (str(rec.get("job", "?")), str(rec.get("site") or rec.get("actor", "?")))
        row = rows.setdefault(key, {"job": key[0], "site": key[1], "epsilon": 0.0, "releases": 0, "refused": 0})
        row["delta"], row["max_epsilon"] = rec.get("delta"), rec.get("max_epsilon")
        if rec["kind"] == "privacy_spent":
            row["epsilon"], row["releases"] = rec.get("epsilon", 0.0), rec.get("releases", 0)
        else:
            row["refused"] += 1
    return list(rows.values())


def format_privacy(rows: Iterable[dict[str, Any]]) -> str:
    """The ``privacy_spent`` rows as a table."""
    lines = [f"{'JOB':<28} {'SITE':<16} {'EPSILON':>10} {'DELTA':>8} {'MAX':>8} {'RELEASES':>8} {'REFUSED':>7}"]
    for r in rows:
        cap = "-" if r.get("max_epsilon") is None else f"{r['max_epsilon']:g}"
        delta = "-" if r.get("delta") is None else f"{r['delta']:g}"
        lines.append(
            f"{r['job']:<28} {r['site']:<16} {r['epsilon']:>10.4f} {delta:>8} {cap:>8} {r['releases']:>8} "
            f"{r['refused']:>7}"
        )
    return "\n".join(lines)
