"""The site host: thousands of simulated sites as records, spoken for by one object on the simulator's loop.

A site here is a ``SiteRecord`` (name, index, speed factor, bandwidth, online or not, the state its script
keeps between tasks): no daemon, no folder, no thread. Each online site is a name on the simulation's
``MemoryHub``, so the broker, through ``SimBrokerEndpoint``, sees one peer per site exactly as it would over
sockets: each site says ``hello``, gets its ``welcome``, the job's ``deploy``, ``task`` messages and the global
model as a stream (the real ``StreamHub`` on both sides), and answers with ``result`` and its update's stream.

Theory of operation.

* A task's model arrives (at simulated time t): the host hands the task to the ``WorkerPool`` at once, and, when
  the simulation models training time (``train_s``), schedules the result at
  ``t + down + train_s x speed + up`` (``down``/``up``: model bytes over the site's bandwidth). The worker
  computes meanwhile; if the clock reaches the result's time first, the host holds the clock until the worker
  is done. With measured training time (``train_s=None``) the clock is held from the start, and the result is
  scheduled at ``t + down + compute x speed + up`` once the worker measured ``compute``. Either way simulated
  time never passes an event a computing task could still cause.
* Events (results, availability changes) are the host's own queue, ordered by (time, site index, kind, task),
  handed to the clock one at a time (``fire``), so a run's order of events does not depend on which worker
  finished first.
* A site going away (``availability``) says ``bye`` and leaves the hub; the broker declares it gone, and the
  strategy loses its task, as in production. A result due for a task it no longer holds is dropped. Coming
  back, it says ``hello`` again; the broker deploys its running job to it again and the strategy may use it.
* A worker's error is the site's script crashing: the host reports ``crashed`` for the job, and the broker
  fails the task and drops the site from the job, as it does for a real site.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbus.errors import FedbusError, PeerUnreachable, RemoteProtocolError
from fedbus.jobs import unpack_job
from fedbus.log import get_logger
from fedbus.modelio.sinks import BufferSink, Received
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.messages import (
    STREAM_TYPES,
    Bye,
    Deploy,
    EndJob,
    Hello,
    JobEvent,
    Message,
    Offer,
    Result,
    Task,
)
from fedbus.recipes.simtime.loop import SimClock
from fedbus.recipes.simtime.pool import JobCode, SiteTask, TaskOutcome, WorkerPool, task_seed
from fedbus.recipes.simtime.wire import BROKER, frames_of, incoming
from fedbus.transport.memory import MemoryHub
from fedbus.transport.streams import StreamHub

log = get_logger("recipes.simtime")
INLINE_BYTES = 64 << 20
"""Stream chunk size in a simulation: models ride whole in their offer (no chunk threads, nothing to pace)."""


@dataclass(slots=True)
class SiteRecord:
    """One simulated site."""

    name: str
    index: int
    speed: float = 1.0
    bandwidth: float | None = None
    """Bytes per simulated second each way; None: transfers take no time."""
    online: bool = False
    state: dict[str, Any] | None = None
    task: _Work | None = None

    @property
    def identity(self) -> bytes:
        return f"site:{self.name}".encode()


@dataclass(slots=True)
class _Work:
    """A task a site holds: its model arrived; the worker's outcome when done."""

    task: Task
    started: float
    future: concurrent.futures.Future[TaskOutcome] | None = None
    due: float | None = None
    nbytes: int = 0


@dataclass(order=True, slots=True)
class _Event:
    time: float
    index: int
    kind: int  # 0: availability, 1: result (a site that leaves at t takes its result due at t with it)
    key: str
    up: bool = field(default=False, compare=False)


class _SiteEntry:
    """A site's name on the hub: what the broker sends it goes to the host's queue, tagged with the site."""

    def __init__(self, host: SiteHost, rec: SiteRecord) -> None:
        self.inbox = self
        self.host = host
        self.rec = rec

    def put_nowait(self, item: tuple[bytes, list[bytes]]) -> None:
        self.host._queue.append((self.rec, item[1]))
        waiter = self.host._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Uplink:
    """The host's stream hub endpoint: ``peer`` is the site that sends (the broker is the one receiver)."""

    def __init__(self, host: SiteHost) -> None:
        self.host = host

    async def send(self, peer: bytes, msg: Message, payload: Sequence[Any] = ()) -> None:
        self.host.send_as(peer, msg, payload)


class SiteHost:
    """Speaks for every simulated site (see the module docstring)."""

    def __init__(
        self,
        hub: MemoryHub,
        sites: Sequence[SiteRecord],
        pool: WorkerPool,
        clock: SimClock,
        *,
        workspace: Path,
        seed: int = 0,
        train_s: float | None = 1.0,
        availability: Sequence[tuple[float, int, bool]] = (),
        observer: Callable[[dict[str, Any]], None] | None = None,
        prepare: Callable[[str, Path, Sequence[str]], None] | None = None,
        max_model_bytes: int = 16 << 30,
    ) -> None:
        self.hub = hub
        self.sites = list(sites)
        self.by_identity = {rec.identity: rec for rec in self.sites}
        self.pool = pool
        self.clock = clock
        self.workspace = workspace
        self.seed = seed
        self.train_s = train_s
        self.observer = observer
        self.prepare = prepare
        self.max_model_bytes = max_model_bytes
        self.session = "simulated"
        self.jobs: dict[str, asyncio.Future[JobCode]] = {}
        self.ended: set[str] = set()
        self.updates = 0
        self.compute_s = 0.0
        self._events: list[_Event] = [_Event(t, i, 0, "", up) for t, i, up in availability]
        heapq.heapify(self._events)
        self._queue: deque[tuple[SiteRecord, list[bytes]]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._expected: dict[tuple[bytes, int], Task] = {}
        self.streams = StreamHub(
            _Uplink(self), on_offer=self._on_offer, chunk_size=INLINE_BYTES, max_total=max_model_bytes
        )
        self._reader: asyncio.Task[None] | None = None

    # --- life cycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Every site says hello (all are online when the run starts; availability applies from then on)."""
        self.clock.sources.append(self)
        self._reader = asyncio.ensure_future(self._read())
        for rec in self.sites:
            self._connect(rec)

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.clock.sources.remove(self)
        if self._reader is not None:
            self._reader.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.streams.close()
        for rec in self.sites:
            self.hub.endpoints.pop(rec.identity, None)

    def _connect(self, rec: SiteRecord) -> None:
        rec.online = True
        self.hub.endpoints[rec.identity] = _SiteEntry(self, rec)  # type: ignore[assignment]
        self.send_as(rec.identity, Hello(role="site", name=rec.name, session=self.session, caps={"simulated": True}))

    def _disconnect(self, rec: SiteRecord, why: str) -> None:
        with contextlib.suppress(PeerUnreachable):
            self.send_as(rec.identity, Bye(why))
        rec.online = False
        rec.task = None
        self.hub.endpoints.pop(rec.identity, None)
        self.streams.abort_peer(rec.identity, f"site left: {why}")

    # --- the simulated clock's view -------------------------------------------------------------------

    def next_event(self) -> float | None:
        return self._events[0].time if self._events else None

    def fire(self) -> None:
        ev = heapq.heappop(self._events)
        rec = self.sites[ev.index]
        if ev.kind == 0:
            if ev.up and not rec.online:
                self._connect(rec)
            elif not ev.up and rec.online:
                self._disconnect(rec, "unavailable")
            return
        work = rec.task
        if work is None or work.task.task_id != ev.key or not rec.online:
            return  # the site left (and lost the task) before its result was due
        assert work.future is not None
        if work.future.done():
            self._deliver(rec, work)
            return
        self.clock.hold()  # the result is due, the worker still computes: nothing may happen before it
        loop = asyncio.get_running_loop()
        work.future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._computed_late, rec, work))

    def _computed_late(self, rec: SiteRecord, work: _Work) -> None:
        self.clock.release()
        if rec.task is work and rec.online:
            self._deliver(rec, work)

    # --- messages from the broker ----------------------------------------------------------------------

    def send_as(self, identity: bytes, msg: Message, payload: Sequence[Any] = ()) -> None:
        broker = self.hub.endpoints.get(BROKER)
        rec = self.by_identity.get(identity)
        if broker is None or rec is None or not rec.online:
            raise PeerUnreachable(f"{identity!r} cannot reach the broker")
        broker.inbox.put_nowait((identity, frames_of(msg, payload)))

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self._queue:
                rec, frames = self._queue.popleft()
                try:
                    inc = incoming(BROKER, frames)
                    await self._on_broker(rec, inc.msg, inc.payload)
                except FedbusError as exc:
                    log.warning("simulated site refused a broker message", site=rec.name, reason=str(exc))
                except Exception:  # a bug here must not stall every site: say so loudly and go on
                    log.error("simulated site failed on a broker message", site=rec.name, exc_info=True)
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def _on_broker(self, rec: SiteRecord, msg: Message, payload: list[memoryview]) -> None:
        if msg.TYPE in STREAM_TYPES:
            await self.streams.dispatch(rec.identity, msg, payload)
        elif isinstance(msg, Deploy):
            if msg.job_id not in self.jobs:
                self.jobs[msg.job_id] = asyncio.ensure_future(self._unpack(msg, bytes(payload[0])))
        elif isinstance(msg, Task):
            job = self.jobs.get(msg.job_id)
            if job is None:
                raise RemoteProtocolError(f"task for job {msg.job_id[:80]!r}, which was not deployed here")
            await job
            if msg.job_id in self.ended or not rec.online:
                return
            if msg.sid is None:
                self._ready(rec, msg, None)
            else:
                self._expected[(rec.identity, msg.sid)] = msg
        elif isinstance(msg, EndJob):  # every site of the job hears it: each drops its own task
            self.ended.add(msg.job_id)
            if rec.task is not None and rec.task.task.job_id == msg.job_id:
                rec.task = None

    async def _unpack(self, msg: Deploy, archive: bytes) -> JobCode:
        folder = self.workspace / "jobs" / msg.job_id
        folder.mkdir(parents=True, exist_ok=True)
        spec = await asyncio.to_thread(unpack_job, archive, folder, require_model=False, check_strategy=False)
        num_sites = msg.config.get("num_sites")
        job = JobCode(
            msg.job_id,
            folder,
            msg.script,
            tuple(str(a) for a in msg.args),
            num_sites if isinstance(num_sites, int) else len(self.sites),
            archive,
            dict(spec.extra.get("privacy", {})),
        )
        if self.prepare is not None:
            self.prepare(msg.job_id, folder / msg.script, job.args)
        self.pool.open(job)
        return job

    async def _on_offer(self, peer: bytes, offer: Offer) -> BufferSink | None:
        task = self._expected.pop((peer, offer.sid), None)
        rec = self.by_identity.get(peer)
        if task is None or rec is None:
            return None
        sink = BufferSink(max_total=self.max_model_bytes)
        self._spawn(self._await_model(rec, task, sink))
        return sink

    async def _await_model(self, rec: SiteRecord, task: Task, sink: BufferSink) -> None:
        try:
            received = await sink.result
        except FedbusError as exc:
            log.warning("simulated site lost a model stream", site=rec.name, reason=str(exc))
            return
        self._ready(rec, task, received)

    # --- tasks -----------------------------------------------------------------------------------------

    def _ready(self, rec: SiteRecord, task: Task, received: Received | None) -> None:
        """The task's model is here: the pool starts on it; its result is scheduled (see the module docstring)."""
        if not rec.online or task.job_id in self.ended:
            return
        # the received stream's own buffer (a fresh one per stream, kept alive by the task): no copy here
        model = received.raw.numpy().data if received is not None else None
        plain = task.task_id.rsplit(".", 1)[0]
        site_task = SiteTask(
            job_id=task.job_id,
            task_id=task.task_id,
            site=rec.name,
            index=rec.index,  # its data partition: the site's place among the simulated sites
            kind=task.kind,
            version=task.version,
            round=task.round,
            total_rounds=task.total_rounds,
            model=model,
            params_type=task.params_type,
            options=task.options,
            seed=task_seed(self.seed, rec.name, plain),
            state=rec.state,
            meta=task.meta,
        )
        nbytes = len(model) if model is not None else 0
        work = _Work(task, self.clock.now, nbytes=nbytes)
        rec.task = work
        work.future = self.pool.submit(site_task)
        if self.train_s is not None:
            seconds = self.train_s * rec.speed if task.kind == "train" else 0.0
            self._schedule(rec, work, seconds)
        else:
            self.clock.hold()
            loop = asyncio.get_running_loop()
            work.future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._measured, rec, work))

    def _measured(self, rec: SiteRecord, work: _Work) -> None:
        self.clock.release()
        assert work.future is not None
        if rec.task is work:
            self._schedule(rec, work, work.future.result().compute_s * rec.speed)

    def _schedule(self, rec: SiteRecord, work: _Work, train_s: float) -> None:
        transfer = 0.0 if not rec.bandwidth else 2 * work.nbytes / rec.bandwidth
        work.due = work.started + transfer + train_s
        heapq.heappush(self._events, _Event(work.due, rec.index, 1, work.task.task_id))

    def _deliver(self, rec: SiteRecord, work: _Work) -> None:
        rec.task = None
        assert work.future is not None
        outcome = work.future.result()
        if outcome.state:
            rec.state = outcome.state
        self.compute_s += outcome.compute_s
        self._spawn(self._upload(rec, work, outcome))

    async def _upload(self, rec: SiteRecord, work: _Work, outcome: TaskOutcome) -> None:
        t = work.task
        try:
            if outcome.error is not None:
                log.warning("simulated site's script failed", site=rec.name, task=t.task_id, error=outcome.error[-300:])
                self.send_as(rec.identity, JobEvent(t.job_id, "crashed", code=1, detail=outcome.error[-4000:]))
                return
            source = ModelSource.from_state_dict(outcome.params) if outcome.params is not None else None
            sid = (hash((t.task_id, rec.index)) & ((1 << 62) - 1)) if source is not None else None
            result = Result(
                t.job_id, t.task_id, t.version, outcome.params_type, outcome.weight, outcome.metrics, outcome.meta, sid
            )
            self.send_as(rec.identity, result)
            if source is not None:
                await self.streams.send(rec.identity, source, {"job_id": t.job_id, "task_id": t.task_id}, sid)
        except FedbusError as exc:  # the site left meanwhile, or the broker refused the upload: a lost update
            log.info("simulated update lost", site=rec.name, task=t.task_id, reason=str(exc))
            return
        self.updates += 1
        if self.observer is not None:
            self.observer(
                {
                    "site": rec.name,
                    "job_id": t.job_id,
                    "task_id": t.task_id,
                    "kind": t.kind,
                    "version": t.version,
                    "train_s": round(outcome.compute_s, 6),
                    "sim_start": work.started,
                    "sim_end": self.clock.now,
                    "received_at": time.time(),
                }
            )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
