"""One job's streams: its tasks in flight, the models they stream, the uploads coming back, its checkpoints.

The bookkeeping under a job's controller (``fedbus.broker.controller``), which decides; this part moves bytes
and remembers what is in flight:

* **Tasks in flight**, by task id as on the wire (the strategy's id and this controller's epoch: a broker
  restarted on its workspace starts a new strategy whose ids repeat the old ones, and a site still holding an
  old task must not mistake one for the other). Each has its latest download's ``sid``: the failure of one it
  replaced is told apart. A task is sent as a ``task`` message, then its model streamed.
* **Model sources**: one ``ModelSource`` per published version, so N sites share one set of chunk digests, and
  one per named model a dispatch streams (cross-site evaluation), shared by the sites too.
* **Uploads being collected**: a ``result`` message comes first (same connection, so ordered), then its
  stream's offer. An upload of one chunk goes to memory; a larger one waits for an upload slot and is spooled
  to a file in the job's folder (page cache, not broker memory). One that stalls while others wait loses its
  slot (``fedbus.broker.upload_slots``). Once complete and verified it is handed to the
  controller to decide; once that decision is in the store, the stream's ``ACK`` may go (``sink.settled``).
* **The checkpoint chain**: each published version's checkpoint is written on a worker thread after the
  previous one's (in order, one at a time) and recorded in SQLite. Each unwritten checkpoint holds its model in
  memory, so once ``CHECKPOINTS_BEHIND`` are waiting, new tasks wait for the disk. A write that fails (a full
  disk, an I/O error, a read-only file system) is tried again with backoff, the model still in memory, until it
  lands: no version is skipped. Meanwhile the job is paused (``paused``: no new task goes out), as it is while
  the store cannot write (``fedbus.broker.faults``); it resumes by itself once the write succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fedbus.broker.faults import Backoff, Fault, checkpoint_key
from fedbus.broker.store import JobStore
from fedbus.broker.upload_slots import Holder, UploadSlots
from fedbus.errors import FedbusError
from fedbus.log import get_logger
from fedbus.modelio.sinks import BufferSink
from fedbus.modelio.sources import ModelSource
from fedbus.modelio.spool import SpoolSink
from fedbus.protocol.messages import Message, Offer, Result, Task
from fedbus.recycle import FilePool
from fedbus.strategy import Dispatch, Publish
from fedbus.strategy.base import Params
from fedbus.transport.streams import DEFAULT_CHUNK, StreamHub

CHECKPOINTS_BEHIND = 2
"""Published versions whose checkpoint has not landed, at most, while new tasks go out. Each holds its model in
memory until written: on a disk slower than the rounds (an fsync of the whole model every round) an unbounded
backlog would grow the broker by a model a round. Two leave the next write room to overlap a round on a disk
that keeps up (docs/benchmarks.md, "Why the defaults")."""

SMALL_UPLOAD = DEFAULT_CHUNK
"""Uploads of at most one chunk and this many bytes are received into memory instead of a spool file."""


class Bus(Protocol):
    """What a job's streams need from the broker daemon (``fedbus.broker.outbox.Outbox``)."""

    hub: StreamHub | None

    def peer_of(self, site: str) -> bytes | None: ...

    async def send(self, peer: bytes, msg: Message, payload: Any = ()) -> None: ...

    async def stream(self, peer: bytes, source: ModelSource, route: dict, sid: int) -> None: ...


@dataclass
class PendingResult:
    site: str
    result: Result
    task_sid: int  # the task's download when the result came: a failed upload does not fail a task sent again
    kind: str = field(default="train")  # the task's kind: what its params are checked against


@dataclass(frozen=True)
class InFlight:
    """A task sent and not answered yet: what a site that restarted without it is sent again. ``sid`` is its
    latest download's, so that the failure of one it replaced is told apart."""

    action: Dispatch
    sid: int


TaskFailed = Callable[..., None]
"""``task_failed(site, wire task id, reason, sid)``: the controller's, told of a download or upload that failed."""

Decide = Callable[..., "asyncio.Future | None"]
"""``decide(site, result, params, heavy=...)``: the controller's, handed a complete upload; the future (if any)
is done once the decision is recorded."""


class JobStreams:
    """The tasks, sources, uploads and checkpoints of one job; all methods run on the broker's event loop."""

    def __init__(
        self,
        job_id: str,
        store: JobStore,
        bus: Bus,
        *,
        task_fields: Mapping[str, Any],
        max_model_bytes: int,
        upload_slots: UploadSlots,
        keep_versions: int,
        running: Callable[[], bool],
        task_failed: TaskFailed,
        decide: Decide,
        spawn: Callable[[Coroutine[Any, Any, Any]], object],
    ) -> None:
        self.job_id = job_id
        self.store = store
        self.bus = bus
        self.params_type: str = task_fields["params_type"]
        self.options: dict[str, Any] = task_fields["options"]
        self.total_rounds: int = task_fields["total_rounds"]
        self.max_model_bytes = max_model_bytes
        self.upload_slots = upload_slots
        self.keep_versions = keep_versions
        self.running = running
        self.task_failed = task_failed
        self.decide = decide
        self.spawn = spawn
        self.log = get_logger("broker.controller", job=job_id)
        self.epoch = secrets.token_hex(3)
        self.tasks: dict[str, InFlight] = {}  # by task id as on the wire
        self.pending: dict[tuple[bytes, int], PendingResult] = {}  # (peer, sid) -> its result, awaiting the stream
        self.source: ModelSource | None = None
        self.source_version = -1
        self.named: dict[str, ModelSource] = {}  # the models dispatches name (cross-site evaluation), by name
        self.spool_pool: FilePool | None = None
        self.chain: asyncio.Future | None = None  # the newest checkpoint; each waits for the one before
        self.unsaved = 0  # published versions whose checkpoint has not landed
        self._saved = asyncio.Event()  # set whenever one lands, or the store recovers
        self._unlisten = store.on_recovered(self._saved.set)

    def wire(self, task_id: str) -> str:
        return f"{task_id}.{self.epoch}"

    def plain(self, wire: str) -> str:
        return wire.removesuffix(f".{self.epoch}")

    # --- tasks in flight ---------------------------------------------------------------------------------

    def dispatch(self, action: Dispatch) -> None:
        self.send_claimed(self.claim(action))

    def claim(self, action: Dispatch) -> InFlight:
        """The task is in flight from now on, with a new download: a failure of any earlier one is ignored."""
        claimed = InFlight(action, secrets.randbits(62))
        self.tasks[self.wire(action.task_id)] = claimed
        return claimed

    def settle(self, task_id: str, sid: int | None = None) -> bool:
        """The task is answered or failed: no longer in flight. False if it was not (or ``sid`` is not its
        latest download: a task sent again since is not settled by the old one)."""
        sent = self.tasks.get(task_id)
        if sent is None or (sid is not None and sent.sid != sid):
            return False
        del self.tasks[task_id]
        return True

    def tasks_at(self, site: str) -> list[str]:
        return [task_id for task_id, sent in self.tasks.items() if sent.action.site == site]

    def send_claimed(self, claimed: InFlight) -> None:
        action, sid = claimed.action, claimed.sid
        peer = self.bus.peer_of(action.site)
        wire = self.wire(action.task_id)
        if peer is None or self.source is None:
            # Not re-entrant: the strategy hears of the failure after the current action list has run.
            asyncio.get_running_loop().call_soon(self.task_failed, action.site, wire, "site is not connected", sid)
            return
        source = self.source_for(action)
        options = self.options
        if action.kind == "submit_model":
            options = {**options, "submit_model": True}
        task = Task(
            job_id=self.job_id,
            task_id=wire,
            kind=action.kind,
            version=action.version,
            round=action.version,
            total_rounds=self.total_rounds,
            sid=sid if source is not None else None,  # no model follows: the site hands the task on at once
            options=options,
            params_type="FULL" if action.kind == "submit_model" else self.params_type,
            model_name=action.model_name,
        )
        self.spawn(self._send_task(peer, action, task, source, sid))

    def source_for(self, action: Dispatch) -> ModelSource | None:
        """What the task streams: the global version, the dispatch's own model, or nothing (submit_model)."""
        if action.kind == "submit_model":
            return None
        if action.model is None:
            return self.source
        source = self.named.get(action.model_name)
        if source is None:
            source = self.named[action.model_name] = ModelSource.from_state_dict(action.model)
        return source

    async def _send_task(self, peer: bytes, action: Dispatch, task: Task, source: ModelSource | None, sid: int) -> None:
        # The checkpoint of this version may still be being written: the stream comes from memory, so the
        # next round does not wait for the disk unless it is CHECKPOINTS_BEHIND. (After a crash, results for
        # an unsaved version are refused.)
        started = time.monotonic()
        while (self.unsaved > CHECKPOINTS_BEHIND or self.paused() is not None) and self.running():
            self._saved.clear()  # the disk is behind, or failing: do not outrun the writes
            await self._saved.wait()
        if not self.current(task.task_id, sid):
            return
        try:
            await self.bus.send(peer, task)
            if source is None or not self.current(task.task_id, sid):
                return
            await self.bus.stream(peer, source, {"job_id": self.job_id, "task_id": task.task_id}, sid)
        except FedbusError as exc:
            self.task_failed(action.site, task.task_id, f"model download failed: {exc}", sid)
            return
        self.log.debug("model sent", site=action.site, task=task.task_id, seconds=round(time.monotonic() - started, 4))

    def current(self, task_id: str, sid: int) -> bool:
        """Whether this is still the task's download: not answered, failed, ended or sent again since."""
        sent = self.tasks.get(task_id)
        return self.running() and sent is not None and sent.sid == sid

    def restarted(self, site: str, holds: frozenset[str], lost: Callable[[str], None]) -> list[InFlight]:
        """A site's daemon came back as a new process: the tasks it does not hold get a new download (returned,
        for ``send_again``) when they can be sent again, else ``lost(task id)`` (see the controller's
        ``site_restarted``)."""
        again: list[InFlight] = []
        for wire, sent in list(self.tasks.items()):
            if sent.action.site != site or wire in holds:
                continue
            if sent.action.version == self.source_version or self.source_for(sent.action) is not self.source:
                again.append(self.claim(sent.action))
            else:
                lost(wire)
        return again

    def send_again(self, again: list[InFlight]) -> None:
        """Send the tasks ``restarted`` claimed, those still in flight as claimed."""
        for claimed in again:
            wire = self.wire(claimed.action.task_id)
            if self.running() and self.tasks.get(wire) is claimed:
                self.log.info("task sent again: the site restarted without it", site=claimed.action.site, task=wire)
                self.send_claimed(claimed)

    # --- model sources and checkpoints -------------------------------------------------------------------

    def serve(self, model: Mapping[str, torch.Tensor], version: int) -> None:
        """Stream ``model`` as version ``version`` to the next dispatches."""
        self.source = ModelSource.from_state_dict(model)
        self.source_version = version

    def publish(self, action: Publish) -> None:
        """A new version: streamed from memory from now on, its checkpoint chained behind the previous one's."""
        self.serve(action.model, action.version)
        self.unsaved += 1
        self.chain = asyncio.ensure_future(self._checkpoint(action, time.time(), self.chain))

    def paused(self) -> Fault | None:
        """The storage fault that holds this job up (its checkpoint's, or the store's), if any."""
        return self.store.faults.holding(self.job_id)

    async def _checkpoint(self, action: Publish, published: float, before: asyncio.Future | None) -> None:
        try:
            if before is not None:
                with contextlib.suppress(Exception):  # its failure was logged by its own call
                    await before
            path = await self._write_checkpoint(action)
            self.store.add_version(self.job_id, action.version, path, action.metrics, published)
            self.store.prune(self.job_id, self.keep_versions)
            self.store.release_covered(self.job_id, action.version)  # their kept params are in this checkpoint now
        except Exception:
            self.log.exception("checkpoint failed", version=action.version)
            raise
        finally:
            self.unsaved -= 1
            self._saved.set()

    async def _write_checkpoint(self, action: Publish) -> Path:
        """Write the version's checkpoint file, trying again with backoff while the disk fails (see the module's
        doc); the model stays in memory until it lands."""
        backoff, key = Backoff(), checkpoint_key(self.job_id)
        while True:
            try:
                path = await asyncio.to_thread(self.store.write_checkpoint, self.job_id, action.version, action.model)
            except OSError as exc:
                where = str(self.store.checkpoint_path(self.job_id, action.version))
                what = f"checkpoint of version {action.version}"
                fault = self.store.faults.failed(key, what, where, exc, self.job_id, time.time())
                delay = backoff.next()
                if fault.attempts == 1:
                    self.log.error(
                        "checkpoint write failed: the job pauses, the version is kept in memory and written again",
                        version=action.version,
                        path=where,
                        errno=fault.errno_name,
                        error=fault.error,
                    )
                await asyncio.sleep(delay)
                continue
            over = self.store.faults.cleared(key)
            if over is not None:
                self.log.warning(
                    "checkpoint written once the workspace took writes again: the job resumes",
                    version=action.version,
                    path=str(path),
                    seconds=round(time.time() - over.since, 3),
                    attempts=over.attempts,
                )
                self._saved.set()
            return path

    async def flush(self) -> None:
        """Wait for the last checkpoint to land (its failure was logged)."""
        if self.chain is not None:
            with contextlib.suppress(Exception):
                await self.chain

    # --- uploads -----------------------------------------------------------------------------------------

    def expect_upload(self, peer: bytes, site: str, result: Result, sent: InFlight) -> None:
        """A result whose params follow as stream ``result.sid``."""
        self.pending[(peer, result.sid)] = PendingResult(site, result, sent.sid, sent.action.kind)  # type: ignore[index]

    async def receive(self, peer: bytes, offer: Offer, pending: PendingResult, expected: Params) -> BufferSink:
        """Take an upload's stream: into memory if small, else spooled (after an upload slot is free); its
        offer's names, shapes and dtypes are checked against ``expected`` before any payload byte is taken."""
        small = offer.total <= min(offer.chunk, SMALL_UPLOAD)
        sink: BufferSink
        holder: Holder | None = None
        if small:
            # One chunk, most likely already here inside the offer (the inline fast path): memory, not a
            # file, and no upload slot, which bounds the bytes of big uploads in flight (scale bench).
            sink = BufferSink(max_total=self.max_model_bytes, expected=expected, scan_finite=True)
        else:
            holder = await self.upload_slots.acquire(self._holder(peer, offer.sid, pending.site))
            try:
                spool = self.store.job_dir(self.job_id) / "incoming"
                spool.mkdir(parents=True, exist_ok=True)
                if self.spool_pool is None:  # recycled files: their page cache is reused (fedbus/recycle.py)
                    self.spool_pool = FilePool(spool)
                sink = SpoolSink(
                    path=str(spool / f"{pending.result.task_id}.part"),
                    max_total=self.max_model_bytes,
                    expected=expected,
                    pool=self.spool_pool,
                    scan_finite=True,
                )
            except BaseException:
                self.upload_slots.release(holder, completed=False)
                raise
        sink.settled = asyncio.get_running_loop().create_future()  # the site hears of it once it is recorded
        self.spawn(self._collect(peer, offer.sid, pending, sink, slot=holder))
        return sink

    def _holder(self, peer: bytes, sid: int, site: str) -> Holder:
        """The upload as the slots see it: its progress and its abort are its stream's, in the broker's hub."""
        hub = self.bus.hub

        def progress() -> int | None:
            return None if hub is None else hub.received(peer, sid)

        def abort(reason: str) -> bool:
            return hub is not None and hub.abort_incoming(peer, sid, reason)

        return Holder(site, progress, abort)

    async def _collect(
        self, peer: bytes, sid: int, pending: PendingResult, sink: BufferSink, *, slot: Holder | None
    ) -> None:
        started = time.monotonic()
        completed = False
        try:
            params = await sink.result
            completed = True
        except FedbusError as exc:
            # the broker's own disk refusing the spool (fedbus.modelio.spool) is not the site's fault
            blame = not isinstance(exc.__cause__, OSError)
            reason = f"upload failed: {exc}"
            self.task_failed(pending.site, pending.result.task_id, reason, pending.task_sid, blame=blame)
            return
        finally:
            if slot is not None:
                self.upload_slots.release(slot, completed=completed)
            self.pending.pop((peer, sid), None)
        received = time.monotonic()
        task = pending.result.task_id
        self.log.debug("update received", site=pending.site, task=task, seconds=round(received - started, 4))
        try:
            decided = self.decide(pending.site, pending.result, params, heavy=slot is not None)
            if decided is not None:
                await decided
            seconds = round(time.monotonic() - received, 4)
            self.log.debug("update decided", site=pending.site, task=task, seconds=seconds)
        finally:
            getattr(params, "release", lambda: None)()
            if sink.settled is not None:  # accepted or refused, once it is in the store the ack may go
                self.store.when_recorded(functools.partial(_settle, sink.settled))

    def close(self) -> None:
        self._unlisten()
        if self.chain is not None and self.store.faults.get(checkpoint_key(self.job_id)) is not None:
            self.chain.cancel()  # retrying a write the disk refuses: the broker stops without it
            self.store.faults.cleared(checkpoint_key(self.job_id))
        if self.spool_pool is not None:
            self.spool_pool.clear()


def _settle(settled: asyncio.Future[None]) -> None:
    if not settled.done():
        settled.set_result(None)
