"""The broker's incoming model streams: which offers it takes, where each goes, and how many at once.

Every stream a peer offers comes here first (``Uploads.on_offer``, the stream hub's ``on_offer``). It counts
against the peer's streams in flight (``PeerLimits``) until its result is settled, then goes to its owner: a
submitted job's initial model to the job's folder (streamed by its submitter after ``submit``), a site's result to
its job's controller, which checks it and spools it. Each update that arrives, or fails to, is audited with the
digest its stream was verified against. Big uploads take turns on the upload slots; each holds up to a credit
window of memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from fedbus._cores import usable_cores
from fedbus.audit import AuditLog
from fedbus.broker.controller import JobController
from fedbus.broker.job_streams import PendingResult
from fedbus.broker.limits import PeerLimits
from fedbus.broker.metrics import Metrics
from fedbus.broker.outbox import Outbox
from fedbus.broker.store import JobStore
from fedbus.broker.upload_slots import UploadSlots
from fedbus.config import BrokerConfig
from fedbus.errors import FedbusError
from fedbus.log import get_logger
from fedbus.modelio.sinks import BufferSink
from fedbus.modelio.spool import SpoolSink
from fedbus.protocol.messages import End, Offer

MiB = 1 << 20
MAX_END_DIGESTS = 4096
log = get_logger("broker")


def default_upload_slots() -> int:
    """Result streams the broker receives at once, unless its profile says: 4 on machines of 8 cores or more
    (where two or more placement threads write the chunks), else 2. Each upload in flight holds up to a window
    of memory (``UPLOAD_WINDOWS`` for all of them).

    With spare cores, uploads received side by side make rounds shorter within the broker's memory target; on
    a small machine they only take turns on the same cores while each holds a window (docs/benchmarks.md).
    """
    return 4 if usable_cores() >= 8 else 2


UPLOAD_WINDOWS = 64 * MiB
"""What the credit windows of the uploads in flight hold together, unless the profile sets ``window_mb``: 32 MiB
each with two slots, 16 with four. A fixed total keeps the broker's memory at many sites within its target
(``broker_rss_x`` <= 2.5) whatever the slots, at no cost in round time (docs/benchmarks.md)."""


def default_window(slots: int, chunk: int) -> int:
    """Each upload's credit window when the profile does not set one: ``UPLOAD_WINDOWS`` shared by the slots."""
    return max(chunk, UPLOAD_WINDOWS // slots)


class Uploads:
    """Routes and counts the broker's incoming streams."""

    def __init__(
        self,
        config: BrokerConfig,
        store: JobStore,
        *,
        controllers: Mapping[str, JobController],
        limits: PeerLimits,
        metrics: Metrics,
        audit: AuditLog,
        outbox: Outbox,
        spawn: Callable[[Coroutine[Any, Any, Any]], object],
        on_job_ready: Callable[[], Awaitable[None]],
    ) -> None:
        self.config = config
        self.store = store
        self.controllers = controllers
        self.limits = limits
        self.metrics = metrics
        self.audit = audit
        self.outbox = outbox
        self.spawn = spawn
        self.on_job_ready = on_job_ready
        slots = config.upload_slots or default_upload_slots()
        self.slots = UploadSlots(slots, config.upload_stall_s)
        """Big uploads received at once; every job's controller takes its turns on these."""
        self.window = config.window_bytes or default_window(slots, config.chunk_bytes)
        self._models: dict[str, tuple[bytes, int]] = {}  # job id -> (submitter, model size)
        self._end_digests: dict[tuple[bytes, int], str] = {}  # (peer, sid) -> the END digest (the audit's)

    def expect_model(self, job_id: str, submitter: bytes, size: int) -> None:
        """A job was submitted: its initial model, of ``size`` bytes, may now come from its submitter."""
        self._models[job_id] = (submitter, size)

    def note_end(self, peer: bytes, end: End) -> None:
        """A site's ``END``: its digest is what the update's audit record names."""
        self._end_digests[(peer, end.sid)] = end.digest
        while len(self._end_digests) > MAX_END_DIGESTS:  # ENDs of refused streams are never collected
            del self._end_digests[next(iter(self._end_digests))]

    async def on_offer(self, peer: bytes, offer: Offer) -> BufferSink | None:
        """An incoming stream, counted against the peer's streams in flight until its result is settled."""
        if not self.limits.open_stream(peer):
            cap = self.config.max_streams_per_peer
            log.warning("peer over its streams in flight: refusing", peer=peer, sid=offer.sid, limit=cap)
            await self.outbox.send_error(peer, "too_many_streams", f"more than {cap} streams in flight", offer.TYPE)
            return None
        sink = None
        try:
            sink = await self._route(peer, offer)
        finally:
            if sink is None:
                self.limits.close_stream(peer)
            else:
                sink.result.add_done_callback(lambda _: self.limits.close_stream(peer))
        return sink

    async def _route(self, peer: bytes, offer: Offer) -> BufferSink | None:
        job_id = offer.route.get("job_id")
        if not isinstance(job_id, str):
            return None
        if offer.route.get("kind") == "model":
            return self._accept_model(peer, job_id, offer)
        c = self.controllers.get(job_id)
        pending = None if c is None else c.streams.pending.get((peer, offer.sid))
        sink = None if c is None else await c.accept_offer(peer, offer)
        if sink is not None:
            self.metrics.track_incoming(offer.total, sink.result)
            if pending is not None:
                sink.result.add_done_callback(lambda f: self._audit_update(f, peer, offer, pending))
        return sink

    def _audit_update(self, result: asyncio.Future, peer: bytes, offer: Offer, pending: PendingResult) -> None:
        """Every update that arrived (or failed to), with the digest its stream was verified against."""
        # the digest the stream was verified against: in its END, or in its offer (a small model sent inline)
        digest = self._end_digests.pop((peer, offer.sid), None) or offer.digest or None
        r = pending.result
        fields = {"job": r.job_id, "task": r.task_id, "site": pending.site, "version": r.version, "size": offer.total}
        if result.cancelled() or result.exception() is not None:
            reason = "cancelled" if result.cancelled() else str(result.exception())
            self.audit.record("update_failed", **fields, reason=reason)
        else:
            self.audit.record("update_received", **fields, digest=digest)

    def _accept_model(self, peer: bytes, job_id: str, offer: Offer) -> BufferSink | None:
        """A submitted job's initial model, streamed by its submitter into the job's folder."""
        upload = self._models.get(job_id)
        if upload is None or upload[0] != peer:  # a stranger's offer leaves the submitter's upload pending
            return None
        del self._models[job_id]
        job = self.store.job(job_id)
        assert job is not None
        path: Path = self.store.job_dir(job_id) / "files" / job["spec"]["model"]
        sink = SpoolSink(path=str(path), max_total=upload[1], keep=True)
        sink.settled = asyncio.get_running_loop().create_future()  # acknowledged once on stable storage
        self.metrics.track_incoming(offer.total, sink.result)
        self.spawn(self._model_uploaded(job_id, sink))
        return sink

    async def _model_uploaded(self, job_id: str, sink: SpoolSink) -> None:
        try:
            params = await sink.result
        except FedbusError as exc:
            log.warning("model upload failed", job=job_id, reason=str(exc))
            self.store.set_state(job_id, "failed", f"the initial model upload failed: {exc}")
            return
        params.release()
        try:
            await asyncio.to_thread(self.store.sync_files, Path(params.path).parent)
        except OSError as exc:
            log.error("initial model not synced to disk", job=job_id, path=params.path, error=str(exc))
            self.store.set_state(job_id, "failed", f"the initial model could not be written to disk: {exc}")
            assert sink.settled is not None
            sink.settled.set_exception(exc)
            return
        self.store.set_state(job_id, "waiting")
        await self.store.recorded()
        if sink.settled is not None and not sink.settled.done():
            sink.settled.set_result(None)
        log.info("job ready", job=job_id)
        await self.on_job_ready()
