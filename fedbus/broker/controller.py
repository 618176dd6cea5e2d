"""One controller per running job: binds a pure strategy to the bus and the job store.

Theory of operation. The strategy decides, the controller does. Every event (a site joined or left, a
result arrived, a task failed, a deadline passed) goes to the strategy with the current time; the
actions it returns are executed in order:

* ``Dispatch``  → a ``task`` message, then the global model streamed to the site (one ``ModelSource``
                  per version, so N sites share one set of chunk digests), or the dispatch's own model
                  when it names one (cross-site evaluation: one ``ModelSource`` per model name, shared by
                  the sites too), or nothing (``submit_model``: the site sends its local model back).
                  Every task carries ``options`` for the script's client API: the strategy's
                  ``client_options()`` with the job's ``[client]`` table over them (``task_options``);
* ``Publish``   → the version becomes the source for the next dispatches, and its checkpoint is written
                  (worker thread, after the previous version's: in order, one at a time) and recorded in
                  SQLite. Each unwritten checkpoint holds its model in memory, so once
                  ``CHECKPOINTS_BEHIND`` are waiting, new tasks wait for the disk;
* ``Accepted`` / ``Rejected`` / ``Evaluated`` → recorded and logged (an evaluation of a named model is a
                  cell of the job's cross-site matrix, written to ``cross_site_val/`` when the job ends);
* ``Finished`` / ``Failed`` → the job's sites get ``end_job`` and the job's state is final.

Results with params arrive as streams: the ``result`` message comes first (same connection, so
ordered), then the offer; ``accept_offer`` checks the offer's names, shapes and dtypes before any payload
byte is taken: a training result's against the tensors the strategy declares (``input_spec()``: an
aggregator whose sites send gradients or statistics) or else the global model's, a submitted local model's
against the global model's, and spools the upload to a file in the job's folder (page
cache, not broker memory); the strategy then folds it in one tensor at a time. Broker memory is about
the global model plus the aggregate, whatever the number of sites.

Strategy calls run one at a time, in the order their events came. Deciding on a large upload (validating
and folding it: a few tenths of a second for 512 MiB) runs on the job's strategy thread, so that meanwhile
the event loop keeps moving the other sites' bytes; an event that comes while such a call runs waits for it
and is decided after it, as it would have been on the loop. With no large upload in flight a call runs on
the loop at once.

Accepted updates outlive the process where the strategy buffers them (``restores_updates``: FedBuff). Each
one's params are kept under the job's ``kept/`` folder (the spool file is renamed there, a small in-memory
upload is written) and its store row says where, until a recorded checkpoint covers it; a broker restarted
from checkpoint v folds the ones that land after v again (``strategy.restore``), in the order they were
accepted, instead of recording them lost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedbus.broker.metrics import Metrics
from fedbus.broker.store import JobStore
from fedbus.errors import FedbusError
from fedbus.log import get_logger
from fedbus.modelio import serde
from fedbus.modelio.sinks import BufferSink
from fedbus.modelio.sources import ModelSource
from fedbus.modelio.spool import SpooledParams, SpoolSink, open_params
from fedbus.protocol.messages import EndJob, Message, Offer, Result, Task
from fedbus.recycle import FilePool
from fedbus.strategy import (
    Accepted,
    Action,
    Cancel,
    Dispatch,
    Evaluated,
    Failed,
    Finished,
    Publish,
    Rejected,
    Strategy,
    Update,
)
from fedbus.strategy.base import Params, clean_metrics
from fedbus.strategy.cross_site import CrossSiteEval
from fedbus.transport.streams import DEFAULT_CHUNK

CHECKPOINTS_BEHIND = 2
"""Published versions whose checkpoint has not landed, at most, while new tasks go out. Each holds its model in
memory until written: on a disk slower than the rounds (an fsync of the whole model every round) an unbounded
backlog would grow the broker by a model a round. Two leave the next write room to overlap a round on a disk
that keeps up (docs/benchmarks.md, "Why the defaults")."""

SMALL_UPLOAD = DEFAULT_CHUNK
"""Uploads of at most one chunk and this many bytes are received into memory instead of a spool file."""

CLIENT_OPTIONS = ("exchange", "transfer_type", "memory_gc_rounds")
"""The keys of a job's ``[client]`` table that the script's client API reads from ``Task.options``; the others
(``external_process``, ``log_streaming``) are for the site and the simulator."""


def task_options(strategy: Strategy, client: Mapping[str, Any]) -> dict[str, Any]:
    """What every task of the job carries to the client API: the strategy's ``client_options()``, with the
    job's ``[client]`` table (the keys the client understands) over them."""
    options = dict(strategy.client_options())
    options.update({k: v for k, v in client.items() if k in CLIENT_OPTIONS})
    return options


def input_reference(strategy: Strategy, kind: str = "train") -> Params:
    """What a result's params must look like: a training result, what the strategy takes in
    (:meth:`Strategy.input_reference`); a submitted local model, the global model."""
    return strategy.input_reference() if kind == "train" else strategy.model


class Bus(Protocol):
    """What a controller needs from the broker daemon."""

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


class JobController:
    """Drives one job's strategy; all methods run on the broker's event loop."""

    def __init__(
        self,
        job_id: str,
        spec: Mapping[str, Any],
        strategy: Strategy,
        store: JobStore,
        bus: Bus,
        *,
        max_model_bytes: int,
        upload_slots: asyncio.Semaphore,
        on_end: Callable[[str], None] = lambda job_id: None,
        keep_versions: int = 0,
        metrics: Metrics | None = None,
    ) -> None:
        self.job_id = job_id
        self.spec = spec
        self.strategy = strategy
        self.store = store
        self.bus = bus
        self.max_model_bytes = max_model_bytes
        self.upload_slots = upload_slots
        self.spool_pool: FilePool | None = None
        self.on_end = on_end
        self.keep_versions = keep_versions
        self.metrics = metrics
        self.sites: list[str] = []
        self.total_rounds = int(spec.get("strategy_args", {}).get("num_rounds") or 0) or int(
            spec.get("strategy_args", {}).get("num_versions") or 0
        )
        self.params_type = getattr(strategy, "params_type", "FULL")
        self.options = task_options(strategy, spec.get("client") or {})
        self.source: ModelSource | None = None
        self.named: dict[str, ModelSource] = {}  # the models dispatches name (cross-site evaluation), by name
        self.source_version = -1
        self.pending: dict[tuple[bytes, int], PendingResult] = {}
        self.tasks: dict[str, InFlight] = {}  # by task id as on the wire
        # Task ids on the wire carry this controller's epoch: a broker restarted on its workspace starts a new
        # strategy whose ids repeat the old ones, and a site still holding an old task must not mistake one
        # for the other. The strategy sees its own ids; the bus, the sites and the store see these.
        self.epoch = secrets.token_hex(3)
        self.state = "running"
        self.reason = ""
        self.log = get_logger("broker.controller", job=job_id)
        self._timer: asyncio.TimerHandle | None = None
        self._bg: set[asyncio.Task] = set()
        self._chain: asyncio.Future | None = None  # the newest checkpoint; each waits for the one before
        self._unsaved = 0  # published versions whose checkpoint has not landed
        self._saved = asyncio.Event()  # set whenever one lands
        self._folding: Update | None = None  # the update the strategy is deciding on (its params may be kept)
        self._lane: asyncio.Future | None = None  # the last strategy call queued behind a running one
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None  # the strategy thread
        self._state: dict[str, object] | None = None  # the strategy's state as of the last call that ended

    # --- lifecycle -----------------------------------------------------------------------------------------

    def start(self, model: Mapping[str, torch.Tensor], sites: list[str], version: int = 0) -> None:
        self.sites = list(sites)
        self.log.info("job started", sites=sites, version=version, strategy=type(self.strategy).__name__)
        actions = self.strategy.start(model, sites, time.monotonic(), version=version)
        # Stream the strategy's own copy, so the caller's model can be freed.
        self.source = ModelSource.from_state_dict(self.strategy.model)
        self.source_version = self.strategy.version
        self._run(actions)
        if self.strategy.restores_updates:
            self._restore_kept()

    def _restore_kept(self) -> None:
        """Fold again the updates a previous broker accepted after the checkpoint this job started from."""
        restored = dropped = 0
        for row in self.store.kept_updates(self.job_id, self.strategy.version):
            kept = row["kept"]
            try:
                params = open_params(
                    kept["path"],
                    max_total=self.max_model_bytes,
                    offset=kept.get("offset", 0),
                    length=kept.get("length"),
                )
            except (FedbusError, OSError) as exc:
                why = f"accepted, but its kept copy could not be read when the broker restarted: {exc}"
                self.store.drop_update(row["rowid"], why)
                dropped += 1
                continue
            update = Update(
                site=row["site"],
                task_id=row["task_id"],
                base_version=row["version"],
                params=params,
                params_type=kept["params_type"],
                weight=kept["weight"],
                metrics=kept["metrics"],
            )
            try:
                actions = self.strategy.restore(update)
            finally:
                params.release()
            for action in actions:
                if isinstance(action, Accepted):
                    self.store.refold_update(row["rowid"], action.staleness, action.weight)
                    restored += 1
                elif isinstance(action, Rejected):
                    why = f"accepted, but not folded again when the broker restarted: {action.reason}"
                    self.store.drop_update(row["rowid"], why)
                    dropped += 1
                else:
                    self._execute(action)
        if restored or dropped:
            self.log.info("kept updates folded again", restored=restored, dropped=dropped)
        self._schedule_tick()

    def abort(self, reason: str) -> None:
        if self.state == "running":
            self._end("aborted", reason)

    # --- events from the broker ---------------------------------------------------------------------------

    def site_joined(self, site: str) -> None:
        if site in self.sites and self.state == "running":
            now = time.monotonic()  # the event's time, though the call may wait behind a decision
            self._decide(lambda: self.strategy.site_joined(site, now))

    def site_left(self, site: str, why: str) -> None:
        if site in self.sites and self.state == "running":
            self.log.warning("site left", site=site, reason=why)
            now = time.monotonic()
            self._decide(lambda: self.strategy.site_left(site, now))

    def on_result(self, peer: bytes, site: str, result: Result) -> None:
        """A result message: metrics-only results go in now; others wait for their stream."""
        sent = self.tasks.get(result.task_id)
        if sent is None or sent.action.site != site:
            self.log.warning("result for an unknown task refused", site=site, task=result.task_id)
            return
        if result.sid is None:
            self._update(site, result, None)
        else:
            self.pending[(peer, result.sid)] = PendingResult(site, result, sent.sid, sent.action.kind)

    async def accept_offer(self, peer: bytes, offer: Offer) -> BufferSink | None:
        """An upload's offer: spool it to disk (after an upload slot is free) or refuse it."""
        pending = self.pending.get((peer, offer.sid))
        if pending is None or self.state != "running":
            return None
        small = offer.total <= min(offer.chunk, SMALL_UPLOAD)
        expected = input_reference(self.strategy, pending.kind)
        sink: BufferSink
        if small:
            # One chunk, most likely already here inside the offer (the inline fast path): memory, not a
            # file, and no upload slot, which bounds the bytes of big uploads in flight (scale bench).
            sink = BufferSink(max_total=self.max_model_bytes, expected=expected, scan_finite=True)
        else:
            await self.upload_slots.acquire()
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
        sink.settled = asyncio.get_running_loop().create_future()  # the site hears of it once it is recorded
        self._spawn(self._collect(peer, offer.sid, pending, sink, slot=not small))
        return sink

    async def _collect(self, peer: bytes, sid: int, pending: PendingResult, sink: BufferSink, *, slot: bool) -> None:
        started = time.monotonic()
        try:
            params = await sink.result
        except FedbusError as exc:
            self.task_failed(pending.site, pending.result.task_id, f"upload failed: {exc}", pending.task_sid)
            return
        finally:
            if slot:
                self.upload_slots.release()
            self.pending.pop((peer, sid), None)
        received = time.monotonic()
        task = pending.result.task_id
        self.log.debug("update received", site=pending.site, task=task, seconds=round(received - started, 4))
        try:
            decided = self._update(pending.site, pending.result, params, heavy=slot)
            if decided is not None:
                await decided
            seconds = round(time.monotonic() - received, 4)
            self.log.debug("update decided", site=pending.site, task=task, seconds=seconds)
        finally:
            getattr(params, "release", lambda: None)()
            if sink.settled is not None:  # accepted or refused, once it is in the store the ack may go
                self.store.when_recorded(functools.partial(_settle, sink.settled))

    def site_restarted(self, site: str, holds: frozenset[str]) -> list[InFlight]:
        """The site's daemon came back as a new process before it was declared gone (a crash restarted within
        the liveness window). Tasks it holds (an upload it will resume) stay as they are; the others died with
        the old process and get a new download now, so that the old one's failure no longer counts, and are
        sent again under their own ids by ``send_again`` once the job is deployed there: whichever answer
        comes counts once. One on an older version than the model streamed now cannot be sent again: it
        fails, not the site's fault (no step toward benching it), and the strategy decides. One that streams
        its own model (cross-site evaluation), or none, can always be sent again."""
        again: list[InFlight] = []
        if self.state != "running":
            return again
        for wire, sent in list(self.tasks.items()):
            if sent.action.site != site or wire in holds:
                continue
            if sent.action.version == self.source_version or self._source_for(sent.action) is not self.source:
                again.append(self._claim(sent.action))
            else:
                self.task_failed(site, wire, "the site restarted and lost the task", blame=False)
        return again

    def send_again(self, again: list[InFlight]) -> None:
        """Send the tasks ``site_restarted`` claimed, those still in flight as claimed."""
        for claimed in again:
            wire = self._wire(claimed.action.task_id)
            if self.state == "running" and self.tasks.get(wire) is claimed:
                self.log.info("task sent again: the site restarted without it", site=claimed.action.site, task=wire)
                self._send_claimed(claimed)

    def task_failed(self, site: str, task_id: str, reason: str, sid: int | None = None, *, blame: bool = True) -> None:
        """``sid``: the download that failed; a task sent again since then is not failed by it. ``blame``: see
        ``Strategy.task_failed``."""
        sent = self.tasks.get(task_id)
        if sent is None or (sid is not None and sent.sid != sid):
            return
        del self.tasks[task_id]
        if self.state == "running":
            self.store.record_update(self.job_id, task_id, site, -1, accepted=False, reason=reason)
            if self.metrics is not None:
                self.metrics.refused(self.job_id, reason)
            now = time.monotonic()
            plain = self._plain(task_id)
            # blame only when false: a strategy written before the keyword still takes every other failure
            extra = {} if blame else {"blame": False}
            self._decide(lambda: self.strategy.task_failed(site, plain, reason, now, **extra))

    def site_crashed(self, site: str, detail: str) -> None:
        """The site's script died: its tasks are lost and it gets no more of this job's work."""
        for task_id, sent in list(self.tasks.items()):
            if sent.action.site == site:
                self.task_failed(site, task_id, f"script crashed: {detail}")
        self.site_left(site, "script exited")

    def _update(
        self, site: str, result: Result, params: Mapping[str, torch.Tensor] | None, *, heavy: bool = False
    ) -> asyncio.Future | None:
        """Hand a result to the strategy; the future (if any) is done once it is decided and recorded."""
        self.tasks.pop(result.task_id, None)
        update = Update(
            site=site,
            task_id=self._plain(result.task_id),
            base_version=result.version,
            params=params,
            params_type=result.params_type,  # type: ignore[arg-type]
            weight=result.weight,
            metrics=result.metrics,
        )
        now = time.monotonic()
        return self._decide(lambda: self.strategy.on_update(update, now), heavy=heavy, update=update)

    # --- the strategy lane -----------------------------------------------------------------------------------

    def _decide(
        self, call: Callable[[], list[Action]], *, heavy: bool = False, update: Update | None = None
    ) -> asyncio.Future | None:
        """Make one strategy call after every one before it and execute its actions (see the module's doc).

        Returns None when the call ran at once, else a future done once its actions ran.
        """
        if self._lane is None:
            if not heavy:
                self._apply(call(), update)
                return None
            self._state = self.strategy.state()  # what status shows while the thread decides
        queued = asyncio.ensure_future(self._queued(self._lane, call, heavy, update))
        self._lane = queued
        queued.add_done_callback(self._lane_done)
        return queued

    async def _queued(
        self, before: asyncio.Future | None, call: Callable[[], list[Action]], heavy: bool, update: Update | None
    ) -> None:
        if before is not None:
            await asyncio.wait([before])  # its failure is its caller's to see
        if self.state != "running" and update is None:
            return  # the job ended while this event waited: nothing left to decide
        if heavy:
            if self._worker is None:
                self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fedbus-strategy")
            actions = await asyncio.get_running_loop().run_in_executor(self._worker, call)
        else:
            actions = call()
        self._apply(actions, update)

    def _lane_done(self, done: asyncio.Future) -> None:
        if self._lane is done:
            self._lane = None
        if not done.cancelled() and done.exception() is not None:
            self.log.error("strategy call failed", error=repr(done.exception()))

    def _apply(self, actions: list[Action], update: Update | None) -> None:
        self._folding = update
        try:
            self._run(actions)
        finally:
            self._folding = None
            if self._lane is not None:
                self._state = self.strategy.state()

    def _wire(self, task_id: str) -> str:
        return f"{task_id}.{self.epoch}"

    def _plain(self, wire: str) -> str:
        return wire.removesuffix(f".{self.epoch}")

    # --- executing actions ---------------------------------------------------------------------------------

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            self._execute(action)
        self._schedule_tick()

    def _execute(self, action: Action) -> None:
        if self.metrics is not None:
            self.metrics.on_action(self.job_id, action)
        if isinstance(action, Dispatch):
            self._dispatch(action)
        elif isinstance(action, Publish):
            self._publish(action)
        elif isinstance(action, Accepted):
            wire = self._wire(action.task_id)
            self.store.record_update(
                self.job_id,
                wire,
                action.site,
                action.version,
                accepted=True,
                staleness=action.staleness,
                weight=action.weight,
                kept=self._keep(wire, action),
            )
        elif isinstance(action, Rejected):
            self.log.warning("update rejected", site=action.site, task=action.task_id, reason=action.reason)
            wire = self._wire(action.task_id)
            self.store.record_update(self.job_id, wire, action.site, -1, accepted=False, reason=action.reason)
        elif isinstance(action, Evaluated):
            if action.model_name:
                self.store.record_cross_site(
                    self.job_id, action.site, action.model_name, action.version, clean_metrics(action.metrics)
                )
            else:
                self.store.record_event(
                    self.job_id, action.site, "evaluation", {"version": action.version, **action.metrics}
                )
        elif isinstance(action, Cancel):
            self.tasks.pop(self._wire(action.task_id), None)
        elif isinstance(action, Finished):
            self._end("finished", action.reason)
        elif isinstance(action, Failed):
            self._end("failed", action.reason)

    def _keep(self, wire: str, action: Accepted) -> dict[str, Any] | None:
        """Put an accepted update's params where a restarted broker finds them (strategies that buffer only)."""
        update = self._folding
        if not self.strategy.restores_updates or update is None or update.task_id != action.task_id:
            return None
        if update.params is None:
            return None
        params = update.params
        where: dict[str, Any] | None = None
        if isinstance(params, SpooledParams):  # a large upload: its spool file is renamed into kept/
            folder = self.store.kept_dir(self.job_id)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{wire}.safetensors"
            if params.keep_as(path):
                where = {"path": str(path)}
        if where is None:  # a small upload, received into memory: appended to the log of the version it lands in
            raw = getattr(params, "raw", None)  # the bytes as received: no laying out again
            parts = [memoryview(raw.numpy())] if raw is not None else serde.layout(params).parts
            where = self.store.keep_small(self.job_id, action.version + action.staleness + 1, parts)
        return {
            **where,
            "params_type": update.params_type,
            "weight": float(update.weight),
            "metrics": clean_metrics(update.metrics),
        }

    def _dispatch(self, action: Dispatch) -> None:
        self._send_claimed(self._claim(action))

    def _claim(self, action: Dispatch) -> InFlight:
        """The task is in flight from now on, with a new download: a failure of any earlier one is ignored."""
        claimed = InFlight(action, secrets.randbits(62))
        self.tasks[self._wire(action.task_id)] = claimed
        return claimed

    def _send_claimed(self, claimed: InFlight) -> None:
        action, sid = claimed.action, claimed.sid
        peer = self.bus.peer_of(action.site)
        wire = self._wire(action.task_id)
        if peer is None or self.source is None:
            # Not re-entrant: the strategy hears of the failure after the current action list has run.
            asyncio.get_running_loop().call_soon(self.task_failed, action.site, wire, "site is not connected", sid)
            return
        source = self._source_for(action)
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
        self._spawn(self._send_task(peer, action, task, source, sid))

    def _source_for(self, action: Dispatch) -> ModelSource | None:
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
        while self._unsaved > CHECKPOINTS_BEHIND and self.state == "running":  # the disk is behind: do not
            self._saved.clear()  # outrun the writes
            await self._saved.wait()
        if not self._current(task.task_id, sid):
            return
        try:
            await self.bus.send(peer, task)
            if source is None or not self._current(task.task_id, sid):
                return
            await self.bus.stream(peer, source, {"job_id": self.job_id, "task_id": task.task_id}, sid)
        except FedbusError as exc:
            self.task_failed(action.site, task.task_id, f"model download failed: {exc}", sid)
            return
        self.log.debug("model sent", site=action.site, task=task.task_id, seconds=round(time.monotonic() - started, 4))

    def _current(self, task_id: str, sid: int) -> bool:
        """Whether this is still the task's download: not answered, failed, ended or sent again since."""
        sent = self.tasks.get(task_id)
        return self.state == "running" and sent is not None and sent.sid == sid

    def _publish(self, action: Publish) -> None:
        self.source = ModelSource.from_state_dict(action.model)
        self.source_version = action.version
        self.log.info("new global version", round=action.version, version=action.version, **_short(action.metrics))
        self._unsaved += 1
        self._chain = asyncio.ensure_future(self._checkpoint(action, time.time(), self._chain))

    async def _checkpoint(self, action: Publish, published: float, before: asyncio.Future | None) -> None:
        try:
            if before is not None:
                with contextlib.suppress(Exception):  # its failure was logged by its own call
                    await before
            path = await asyncio.to_thread(self.store.write_checkpoint, self.job_id, action.version, action.model)
            self.store.add_version(self.job_id, action.version, path, action.metrics, published)
            self.store.prune(self.job_id, self.keep_versions)
            self.store.release_covered(self.job_id, action.version)  # their kept params are in this checkpoint now
        except Exception:
            self.log.exception("checkpoint failed", version=action.version)
            raise
        finally:
            self._unsaved -= 1
            self._saved.set()

    def _end(self, state: str, reason: str) -> None:
        if self.state != "running":
            return
        self.state, self.reason = state, reason
        if self._timer is not None:
            self._timer.cancel()
        self.log.info("job ended", state=state, reason=reason)
        if self.metrics is not None:
            self.metrics.job_ended(self.job_id)
        self._spawn(self._finish(state, reason))

    async def _finish(self, state: str, reason: str) -> None:
        if self._chain is not None:
            with contextlib.suppress(Exception):
                await self._chain  # the last checkpoint lands before the job is final
        self.named.clear()  # the models cross-site evaluation streamed
        matrix = self.store.cross_site(self.job_id)
        if matrix or isinstance(self.strategy, CrossSiteEval):  # an empty matrix is a result too
            try:
                written = await asyncio.to_thread(self.store.write_cross_site, self.job_id, matrix)
            except OSError as exc:
                self.log.error("cross-site results not written", reason=str(exc))
            else:
                self.log.info("cross-site results written", path=str(written), models=len(matrix))
        self.store.set_state(self.job_id, state, reason)
        self.store.release_covered(self.job_id)
        for site in self.sites:
            peer = self.bus.peer_of(site)
            if peer is not None:
                with contextlib.suppress(FedbusError):
                    await self.bus.send(peer, EndJob(self.job_id, f"{state}: {reason}"))
        self.on_end(self.job_id)

    # --- deadlines and tasks --------------------------------------------------------------------------------

    def _schedule_tick(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.strategy.next_deadline
        if deadline is not None and self.state == "running":
            delay = max(0.0, deadline - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.state == "running":
            self._decide(lambda: self.strategy.tick(time.monotonic()))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._bg):
            task.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)
        if self._lane is not None:
            self._lane.cancel()
        if self._worker is not None:
            self._worker.shutdown(wait=True)  # a fold in progress ends before its spool files go
        if self.spool_pool is not None:
            self.spool_pool.clear()

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "reason": self.reason,
            "version": self.strategy.version,
            "sites": self.sites,
            "tasks_in_flight": len(self.tasks),
            "strategy": self._strategy_state(),
        }

    def _strategy_state(self) -> dict[str, object]:
        """The strategy's state; while its thread is deciding, as it was before (it is changing)."""
        if self._lane is None or self._state is None:
            return self.strategy.state()
        return self._state


def _settle(settled: asyncio.Future[None]) -> None:
    if not settled.done():
        settled.set_result(None)


def _short(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k.replace("/", "_"): (round(v, 4) if isinstance(v, float) else v) for k, v in list(metrics.items())[:8]}
