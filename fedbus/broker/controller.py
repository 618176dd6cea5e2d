"""One controller per running job: binds a pure strategy to the bus and the job store.

Theory of operation. The strategy decides, the controller does. Every event (a site joined or left, a
result arrived, a task failed, a deadline passed) goes to the strategy with the current time; the
actions it returns are executed in order:

* ``Dispatch``  → a ``task`` message, then the global model streamed to the site, or the dispatch's own
                  model when it names one (cross-site evaluation), or nothing (``submit_model``: the site
                  sends its local model back). Every task carries ``options`` for the script's client API:
                  the strategy's ``client_options()`` with the job's ``[client]`` table over them
                  (``task_options``);
* ``Publish``   → the version becomes the source for the next dispatches, and its checkpoint is written
                  and recorded (in order, at most ``CHECKPOINTS_BEHIND`` behind; a write the disk refuses
                  is retried, the job paused meanwhile: ``fedbus.broker.faults``);
* ``Accepted`` / ``Rejected`` / ``Evaluated`` → recorded and logged (an evaluation of a named model is a
                  cell of the job's cross-site matrix, written to ``cross_site_val/`` when the job ends);
* ``Finished`` / ``Failed`` → the job's sites get ``end_job`` and the job's state is final.

What moves bytes and remembers what is in flight (tasks, model sources, uploads being collected, the
checkpoint chain) is the job's ``JobStreams`` (``fedbus.broker.job_streams``); the controller is the
strategy's lane. A result's params arrive as a stream; its offer is checked before any payload byte is taken:
a training result's against the tensors the strategy declares (``input_spec()``: an aggregator whose sites
send gradients or statistics) or else the global model's, a submitted local model's against the global
model's. The strategy folds a complete, verified upload one tensor at a time. Broker memory is about the
global model plus the aggregate, whatever the number of sites.

Strategy calls run one at a time, in the order their events came. Deciding on a large upload (validating
and folding it) runs on the job's strategy thread, so that meanwhile the event loop keeps moving the other
sites' bytes; an event that comes while such a call runs waits for it and is decided after it, as it would
have been on the loop. With no large upload in flight a call runs on the loop at once.

Accepted updates outlive the process where the strategy buffers them (``restores_updates``: FedBuff): see
``fedbus.broker.kept``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch

from fedbus.broker.job_streams import Bus, InFlight, JobStreams
from fedbus.broker.kept import keep_update, restore_kept
from fedbus.broker.metrics import Metrics
from fedbus.broker.store import JobStore
from fedbus.broker.upload_slots import UploadSlots
from fedbus.daemon import SIM_TIME_KEY, Background, loop_is_simulated, loop_now
from fedbus.errors import FedbusError, PeerError
from fedbus.log import get_logger
from fedbus.modelio.sinks import BufferSink
from fedbus.protocol.messages import EndJob, Message, Offer, Result
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
from fedbus.strategy.base import Params, Relay, clean_metrics
from fedbus.strategy.cross_site import CrossSiteEval

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
        upload_slots: UploadSlots,
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
        self.on_end = on_end
        self.metrics = metrics
        self.sites: list[str] = []
        self.params_type = getattr(strategy, "params_type", "FULL")
        self.state = "running"
        self.reason = ""
        self.log = get_logger("broker.controller", job=job_id)
        self.background = Background()
        args = spec.get("strategy_args", {})
        self.streams = JobStreams(
            job_id,
            store,
            bus,
            task_fields={
                "params_type": self.params_type,
                "options": task_options(strategy, spec.get("client") or {}),
                "total_rounds": int(args.get("num_rounds") or 0) or int(args.get("num_versions") or 0),
            },
            max_model_bytes=max_model_bytes,
            upload_slots=upload_slots,
            keep_versions=keep_versions,
            running=lambda: self.state == "running",
            task_failed=self.task_failed,
            decide=self._update,
            spawn=self.background.spawn,
        )
        self._timer: asyncio.TimerHandle | None = None
        self._folding: Update | None = None  # the update the strategy is deciding on (its params may be kept)
        self._lane: asyncio.Future | None = None  # the last strategy call queued behind a running one
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None  # the strategy thread
        self._state: dict[str, object] | None = None  # the strategy's state as of the last call that ended

    # --- lifecycle -----------------------------------------------------------------------------------------

    def start(self, model: Mapping[str, torch.Tensor], sites: list[str], version: int = 0) -> None:
        self.sites = list(sites)
        self.log.info("job started", sites=sites, version=version, strategy=type(self.strategy).__name__)
        actions = self.strategy.start(model, sites, loop_now(), version=version)
        # Stream the strategy's own copy, so the caller's model can be freed.
        self.streams.serve(self.strategy.model, self.strategy.version)
        self._run(actions)
        if self.strategy.restores_updates:
            self._restore_kept()

    def _restore_kept(self) -> None:
        """Fold again the updates a previous broker accepted after the checkpoint this job started from."""
        restored, dropped = restore_kept(self.store, self.job_id, self.strategy, self.max_model_bytes, self._execute)
        if restored or dropped:
            self.log.info("kept updates folded again", restored=restored, dropped=dropped)
        self._schedule_tick()

    def abort(self, reason: str) -> None:
        if self.state == "running":
            self._end("aborted", reason)

    # --- events from the broker ---------------------------------------------------------------------------

    def site_joined(self, site: str) -> None:
        if site in self.sites and self.state == "running":
            now = loop_now()  # the event's time, though the call may wait behind a decision
            self._decide(lambda: self.strategy.site_joined(site, now))

    def site_left(self, site: str, why: str) -> None:
        if site in self.sites and self.state == "running":
            self.log.warning("site left", site=site, reason=why)
            now = loop_now()
            self._decide(lambda: self.strategy.site_left(site, now))

    def on_result(self, peer: bytes, site: str, result: Result) -> None:
        """A result message: metrics-only results go in now; others wait for their stream."""
        sent = self.streams.tasks.get(result.task_id)
        if sent is None or sent.action.site != site:
            self.log.warning("result for an unknown task refused", site=site, task=result.task_id)
            return
        if result.sid is None:
            self._update(site, result, None)
        else:
            self.streams.expect_upload(peer, site, result, sent)

    async def accept_offer(self, peer: bytes, offer: Offer) -> BufferSink | None:
        """An upload's offer: spool it to disk (after an upload slot is free) or refuse it."""
        pending = self.streams.pending.get((peer, offer.sid))
        if pending is None or self.state != "running":
            return None
        return await self.streams.receive(peer, offer, pending, input_reference(self.strategy, pending.kind))

    def site_restarted(self, site: str, holds: frozenset[str]) -> list[InFlight]:
        """The site's daemon came back as a new process before it was declared gone (a crash restarted within
        the liveness window). Tasks it holds (an upload it will resume) stay as they are; the others died with
        the old process and get a new download now, so that the old one's failure no longer counts, and are
        sent again under their own ids by ``send_again`` once the job is deployed there: whichever answer
        comes counts once. One on an older version than the model streamed now cannot be sent again: it
        fails, not the site's fault (no step toward benching it), and the strategy decides. One that streams
        its own model (cross-site evaluation), or none, can always be sent again."""
        if self.state != "running":
            return []
        why = "the site restarted and lost the task"
        return self.streams.restarted(site, holds, lambda wire: self.task_failed(site, wire, why, blame=False))

    def send_again(self, again: list[InFlight]) -> None:
        """Send the tasks ``site_restarted`` claimed, those still in flight as claimed."""
        self.streams.send_again(again)

    def task_failed(self, site: str, task_id: str, reason: str, sid: int | None = None, *, blame: bool = True) -> None:
        """``sid``: the download that failed; a task sent again since then is not failed by it. ``blame``: see
        ``Strategy.task_failed``."""
        if not self.streams.settle(task_id, sid):
            return
        if self.state == "running":
            self.store.record_update(self.job_id, task_id, site, -1, accepted=False, reason=reason)
            if self.metrics is not None:
                self.metrics.refused(self.job_id, reason)
            now = loop_now()
            plain = self.streams.plain(task_id)
            # blame only when false: a strategy written before the keyword still takes every other failure
            extra = {} if blame else {"blame": False}
            self._decide(lambda: self.strategy.task_failed(site, plain, reason, now, **extra))

    def site_crashed(self, site: str, detail: str) -> None:
        """The site's script died: its tasks are lost and it gets no more of this job's work."""
        for task_id in self.streams.tasks_at(site):
            self.task_failed(site, task_id, f"script crashed: {detail}")
        self.site_left(site, "script exited")

    def on_message(self, site: str, msg: Message) -> None:
        """A message of a protocol the strategy runs with its sites (secure aggregation: ``on_message``)."""
        handler = getattr(self.strategy, "on_message", None)
        if handler is None:
            raise PeerError(site, f"job {self.job_id!r} does not take {msg.TYPE!r} messages")
        if self.state == "running":
            now = time.monotonic()
            self._decide(lambda: handler(site, msg, now))

    def _relay(self, action: Relay) -> None:
        """Send a strategy's protocol message to its site, with this job's id (lost if the site is gone)."""
        peer = self.bus.peer_of(action.site)
        if peer is None:
            self.log.warning("protocol message for a site not connected", site=action.site, type=action.message.TYPE)
            return

        async def send() -> None:
            try:
                await self.bus.send(peer, replace(action.message, job_id=self.job_id))  # type: ignore[call-arg]
            except FedbusError as exc:
                self.log.warning("protocol message lost", site=action.site, type=action.message.TYPE, reason=str(exc))

        self.background.spawn(send())

    def _update(
        self, site: str, result: Result, params: Mapping[str, torch.Tensor] | None, *, heavy: bool = False
    ) -> asyncio.Future | None:
        """Hand a result to the strategy; the future (if any) is done once it is decided and recorded."""
        self.streams.tasks.pop(result.task_id, None)
        update = Update(
            site=site,
            task_id=self.streams.plain(result.task_id),
            base_version=result.version,
            params=params,
            params_type=result.params_type,  # type: ignore[arg-type]
            weight=result.weight,
            metrics=result.metrics,
        )
        now = loop_now()
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

    # --- executing actions ---------------------------------------------------------------------------------

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            self._execute(action)
        self._schedule_tick()

    def _execute(self, action: Action) -> None:
        if self.metrics is not None:
            self.metrics.on_action(self.job_id, action)
        if isinstance(action, Dispatch):
            self.streams.dispatch(action)
        elif isinstance(action, Publish):
            if loop_is_simulated():  # the version's simulated time goes into its history beside the wall time
                action = Publish(action.version, action.model, {**action.metrics, SIM_TIME_KEY: loop_now()})
            self.log.info("new global version", round=action.version, version=action.version, **_short(action.metrics))
            self.streams.publish(action)
        elif isinstance(action, Accepted):
            wire = self.streams.wire(action.task_id)
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
            wire = self.streams.wire(action.task_id)
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
            self.streams.tasks.pop(self.streams.wire(action.task_id), None)
        elif isinstance(action, Relay):
            self._relay(action)
        elif isinstance(action, Finished):
            self._end("finished", action.reason)
        elif isinstance(action, Failed):
            self._end("failed", action.reason)

    def _keep(self, wire: str, action: Accepted) -> dict[str, Any] | None:
        """Keep an accepted update's params where a restarted broker finds them (strategies that buffer only)."""
        update = self._folding
        if not self.strategy.restores_updates or update is None or update.task_id != action.task_id:
            return None
        return keep_update(self.store, self.job_id, wire, update, action)

    def _end(self, state: str, reason: str) -> None:
        if self.state != "running":
            return
        self.state, self.reason = state, reason
        if self._timer is not None:
            self._timer.cancel()
        self.log.info("job ended", state=state, reason=reason)
        if self.metrics is not None:
            self.metrics.job_ended(self.job_id)
        self.background.spawn(self._finish(state, reason))

    async def _finish(self, state: str, reason: str) -> None:
        await self.streams.flush()  # the last checkpoint lands before the job is final
        self.streams.named.clear()  # the models cross-site evaluation streamed
        matrix = self.store.cross_site(self.job_id)
        if matrix or isinstance(self.strategy, CrossSiteEval):  # an empty matrix is a result too
            try:
                written = await asyncio.to_thread(self.store.write_cross_site, self.job_id, matrix)
            except OSError as exc:
                self.log.error("cross-site results not written", reason=str(exc))
            else:
                self.log.info("cross-site results written", path=str(written), models=len(matrix))
        self.store.set_state(self.job_id, state, reason)
        await self.store.recorded()  # final on stable storage (after a storage fault: once it cleared)
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
            delay = max(0.0, deadline - loop_now())
            self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.state == "running":
            now = loop_now()
            self._decide(lambda: self.strategy.tick(now))

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        await self.background.cancel()
        if self._lane is not None:
            self._lane.cancel()
        if self._worker is not None:
            self._worker.shutdown(wait=True)  # a fold in progress ends before its spool files go
        self.streams.close()

    def status(self) -> dict[str, Any]:
        """What runs now. ``state`` is ``paused`` while a storage fault holds the job up (its checkpoint cannot
        be written, or the store cannot commit), with the fault as the ``reason``: it resumes by itself."""
        state, reason = self.state, self.reason
        fault = self.streams.paused() if state == "running" else None
        if fault is not None:
            state, reason = "paused", fault.describe(time.time())
        return {
            "state": state,
            "reason": reason,
            "version": self.strategy.version,
            "sites": self.sites,
            "tasks_in_flight": len(self.streams.tasks),
            "strategy": self._strategy_state(),
        }

    def _strategy_state(self) -> dict[str, object]:
        """The strategy's state; while its thread is deciding, as it was before (it is changing)."""
        if self._lane is None or self._state is None:
            return self.strategy.state()
        return self._state


def _short(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k.replace("/", "_"): (round(v, 4) if isinstance(v, float) else v) for k, v in list(metrics.items())[:8]}
