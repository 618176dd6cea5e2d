"""The gate in front of what sites make the broker store: each ``job_event`` is charged to its byte budgets first.

A site in a job may send events (lifecycle events, ``log`` metrics records, ``log_text`` script output) as fast
as the request rate allows; the rate counts messages, not bytes, so without this gate a site decides how fast
the broker's disk fills. Here every event is sized as it would be stored (the JSON of its row, or the lines of
output with their newlines) and charged to ``fedbus.broker.budgets.ByteBudgets`` under the profile's limits
(``event_record_kb``, ``events_mb_per_site``, ``events_mb_per_job``, ``logs_mb_per_site``, ``logs_mb_per_job``).
An event over budget is not stored: its site hears why once (an ``error`` with code ``over_budget``), and the
broker logs and audits the refusals once per burst with their count. A lifecycle event (``exited``,
``crashed``) over budget still reaches the job's controller; only its row is not written.

A job's budgets start from what its store already holds (its event rows by site, its sites' log files), read
once per job: a broker restarted on its workspace gives no site its budget again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fedbus.broker.budgets import EVENTS, LOGS, ByteBudgets, Limits, Refusal
from fedbus.broker.guard import Guard
from fedbus.broker.outbox import Outbox
from fedbus.broker.store import JobStore
from fedbus.config import BrokerConfig
from fedbus.errors import PeerError
from fedbus.log import get_logger
from fedbus.protocol.messages import JobEvent

MiB = 1 << 20
KiB = 1 << 10
BURST_S = 10.0
"""Seconds after a logged refusal during which a site's further refusals are only counted."""
log = get_logger("broker")


def budgets_of(config: BrokerConfig) -> ByteBudgets:
    """The byte budgets a broker profile sets."""
    return ByteBudgets(
        {
            EVENTS: Limits(int(config.events_mb_per_site * MiB), int(config.events_mb_per_job * MiB)),
            LOGS: Limits(int(config.logs_mb_per_site * MiB), int(config.logs_mb_per_job * MiB)),
        },
        max_record=int(config.event_record_kb * KiB),
        burst_s=BURST_S,
    )


def stored_size(msg: JobEvent) -> tuple[str, int]:
    """The class and the bytes an event takes once stored: ``log_text`` lines in the site's log file (each with
    its newline), any other event as its row's JSON (as ``JobStore.record_event`` writes it). ValueError: data
    that cannot be stored."""
    if msg.event == "log_text":
        lines = msg.data.get("lines")
        if not isinstance(lines, list):
            return LOGS, 0  # refused by check_lines, nothing is written
        return LOGS, sum(len(line) + 1 for line in lines if isinstance(line, str))
    try:
        row = json.dumps({"code": msg.code, "detail": msg.detail[:2000], **msg.data}, default=str)
    except (TypeError, RecursionError) as exc:  # e.g. keys that are not strings
        raise ValueError(f"job_event {msg.event[:40]!r}: data cannot be stored: {exc}") from exc
    return EVENTS, len(row)


def size_floor(msg: JobEvent) -> tuple[str, int]:
    """A cheap lower bound of ``stored_size``: the lengths of the event's strings at the top of its data (and
    one level down). A record this bound already refuses is never serialized to be measured."""
    if msg.event == "log_text":
        return stored_size(msg)  # as cheap as a bound
    floor = min(len(msg.detail), 2000)
    for key, value in msg.data.items():
        floor += len(key) if isinstance(key, str) else 0
        values = value.values() if isinstance(value, dict) else (value,)
        floor += sum(len(v) for v in values if isinstance(v, str | bytes))
    return EVENTS, floor


class StoreGate:
    """Charges each site's ``job_event`` to the byte budgets before the broker stores it."""

    def __init__(
        self,
        config: BrokerConfig,
        store: JobStore,
        *,
        outbox: Outbox,
        guard: Guard,
        spawn: Callable[[Coroutine[Any, Any, Any]], object],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budgets = budgets_of(config)
        self.store = store
        self.outbox = outbox
        self.guard = guard
        self.spawn = spawn
        self.clock = clock

    def admit(self, job_id: str, site: str, msg: JobEvent) -> bool:
        """Whether the event may be stored (charged if so); a refusal is told, logged and audited sparingly."""
        if not self.budgets.seeded(job_id):
            self._seed(job_id)
        kind, size = size_floor(msg)
        if self.budgets.fits(job_id, site, kind, size):  # then measured exactly (a flood over budget is not)
            try:
                kind, size = stored_size(msg)
            except ValueError as exc:
                raise PeerError(site, str(exc)) from exc
        refusal = self.budgets.charge(job_id, site, kind, size, self.clock())
        if refusal is None:
            return True
        self._refused(job_id, site, msg, refusal)
        return False

    def _seed(self, job_id: str) -> None:
        self.budgets.seed(job_id, EVENTS, self.store.event_bytes(job_id))
        folder = self.store.job_dir(job_id) / "logs"
        sizes = {p.stem: p.stat().st_size for p in folder.glob("*.log")} if folder.is_dir() else {}
        self.budgets.seed(job_id, LOGS, sizes)

    def _refused(self, job_id: str, site: str, msg: JobEvent, refusal: Refusal) -> None:
        peer = self.outbox.peer_of(site)
        if refusal.log:
            log.warning(
                "job events refused: over the byte budget",
                job=job_id,
                site=site,
                reason=refusal.reason,
                refused=refusal.count,
            )
            self.guard.refused(
                refusal.reason, peer=peer or b"", user=site, type=f"job_event:{msg.event[:32]}", count=refusal.count
            )
        if refusal.tell and peer is not None:
            self.spawn(self.outbox.send_error(peer, "over_budget", refusal.reason, msg.TYPE))
