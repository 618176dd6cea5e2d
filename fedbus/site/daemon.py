"""The site daemon: dials out to the broker, stays connected, and runs the jobs it is given.

Theory of operation. The life cycle is ``fedbus.daemon.Lifecycle`` (uvicorn's shape: ``serve()`` =
``startup()`` / ``main_loop()`` / ``shutdown(deadline)``). The main loop is a connection loop: connect a
DEALER (identity ``site:NAME``, so a reconnect takes over the broker's routing entry), say ``hello``, then one
receive task reads the socket while another sends ``heartbeat`` once welcomed, whenever ``heartbeat_s`` passed
with no message either way (``fedbus.protocol.liveness``). Any message counts as a sign of life; after
``heartbeat_s x liveness`` of silence (the broker's values from ``welcome``) the socket is closed and a new
one connects after a backoff of 0.1 s doubling to 5 s, forever. ``error(hello_required)`` (the broker
restarted and forgot us) is answered with a new hello on the same socket.

Model streams share the socket: stream messages go to one ``StreamHub`` whose endpoint is a stable
wrapper around whichever socket is current, so streams survive a reconnect (incoming ones are resumed
after the welcome). Job events that must not be lost (started, exited, crashed) are queued while the
broker is unreachable and flushed after the next welcome.

Shutdown: a signal only sets ``should_exit``; the jobs' scripts get ``end_job`` and a grace period, the
broker a ``bye``, and whatever is left after ``shutdown_timeout_s`` is killed. A second signal kills the
scripts at once. Nothing from the broker is trusted: an unexpected message is logged and refused with
``error``, and the daemon keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import platform
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedbus.audit import AuditLog
from fedbus.config import SiteConfig, is_safe_name
from fedbus.daemon import Background, Lifecycle, answer_messages, owned_context
from fedbus.errors import FedbusError, RemoteProtocolError, TransportError
from fedbus.he.context import load_site_context
from fedbus.log import get_logger
from fedbus.modelio.sinks import BufferSink
from fedbus.protocol.liveness import heartbeat_due_in
from fedbus.protocol.messages import (
    END_CAUSES,
    MAX_HELD,
    SECAGG_TO_SITE,
    STREAM_TYPES,
    Bye,
    Deploy,
    EndJob,
    Error,
    Heartbeat,
    Hello,
    Message,
    Offer,
    Task,
    Welcome,
)
from fedbus.security import client_keys
from fedbus.site.child import Launcher, ScriptProcess
from fedbus.site.filters import Filter, site_filters
from fedbus.site.folder import remove_leftover_links
from fedbus.site.runner import JobRunner, RunnerSettings
from fedbus.site.uplink import Uplink
from fedbus.site.uploads import PendingUploads, held_jobs, held_tasks
from fedbus.transport.context import Context
from fedbus.transport.curve import handshake_refused
from fedbus.transport.endpoint import DealerEndpoint, Incoming, io_threads, stream_lanes
from fedbus.transport.placement import placement_threads
from fedbus.transport.streams import DEFAULT_CHUNK, DEFAULT_WINDOW

BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0


class _BrokerLeft(Exception):
    """The broker said bye: drop the connection and dial again."""


class Site:
    """One site daemon. ``run()`` blocks (the CLI); ``async with Site(cfg)`` serves in the background."""

    def __init__(
        self,
        config: SiteConfig,
        *,
        filters: Sequence[Filter] = (),
        ctx: Context | None = None,
        end_grace_s: float = 10.0,
        kill_after_s: float = 5.0,
        shutdown_timeout_s: float = 30.0,
        max_model_bytes: int = 16 << 30,
        chunk_size: int = DEFAULT_CHUNK,
        window: int = DEFAULT_WINDOW,
        stall_timeout_s: float = 60.0,
        launcher: Launcher | None = None,
        speed_factor: float | None = None,
        observer: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.workspace = Path(config.workspace).resolve()
        self.keys = client_keys(config.secret_key, config.broker_key, f"site {config.name}")
        if config.he_context is not None:  # checked at start, as the CURVE keys: private, holding the secret key
            load_site_context(config.he_context)
        # The site's own filters: every job's updates pass them last; a job can add filters, never remove these.
        self.audit = AuditLog(self.workspace / "audit.jsonl", actor=config.name)
        self.filters: list[Filter] = [*filters, *site_filters(config, self.workspace, self.audit)]
        self.session = secrets.token_hex(8)
        self.log = get_logger("site", site=config.name)
        self.settings = RunnerSettings(
            config.name,
            config.python,
            config.task_timeout_s,
            end_grace_s,
            kill_after_s,
            max_model_bytes,
            he_context=config.he_context,
        )
        if launcher is not None or speed_factor is not None or observer is not None:  # the simulator's seams
            self.settings = dataclasses.replace(
                self.settings, launcher=launcher or ScriptProcess, speed_factor=speed_factor, observer=observer
            )
        self.shutdown_timeout_s = shutdown_timeout_s
        self.ctx, self._release_ctx = owned_context(ctx, server=False)
        self.uplink = Uplink(
            on_offer=self._on_offer,
            chunk_size=chunk_size,
            window=window,
            max_total=max_model_bytes,
            stall_timeout=stall_timeout_s,
        )
        self.welcomed = self.uplink.welcomed
        self.runners: dict[str, JobRunner] = {}
        self.lifecycle = Lifecycle(self, shutdown_deadline=shutdown_timeout_s, on_force_exit=self._kill_scripts)
        self.hellos = 0  # how many hellos this daemon sent (tests and status watch reconnects with it)
        self._heartbeat_s = config.heartbeat_s
        self._liveness = config.liveness
        self._last_heard = 0.0
        self._hello_at = -math.inf
        self._broker_session: str | None = None  # the session of the broker that welcomed the current hello
        self.background = Background()
        self._session_tasks: list[asyncio.Task] = []

    # --- life cycle -----------------------------------------------------------------------------------

    def run(self) -> None:
        """Blocking entry point for the CLI: serve until SIGINT/SIGTERM."""
        self.lifecycle.run()

    def _kill_scripts(self) -> None:
        """A second signal: the scripts are killed now (``Lifecycle.handle_exit``)."""
        self.log.warning("forced exit: killing the scripts")
        for runner in self.runners.values():
            runner.kill()

    async def __aenter__(self) -> Site:
        await self.lifecycle.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.lifecycle.__aexit__(*exc)

    async def startup(self) -> None:
        (self.workspace / "jobs").mkdir(parents=True, exist_ok=True)
        for leftover in remove_leftover_links(self.workspace):  # a killed process of this site left them
            self.log.info("removed a link folder a killed process of this site left", path=str(leftover))
        self._spawn(self.uplink.flush_loop())
        self.log.info(
            "site starting",
            broker=self.config.broker,
            workspace=str(self.workspace),
            placement_threads=placement_threads(),
            io_threads=io_threads(),
            lanes=self._lanes(),
        )

    async def main_loop(self) -> None:
        """Connect, serve until the broker goes silent, back off, connect again; until should_exit."""
        delay = BACKOFF_MIN
        stop = asyncio.create_task(self.lifecycle.should_exit.wait())
        try:
            while True:
                ep = self._connect()
                session = [asyncio.create_task(self._receive_loop(ep)), asyncio.create_task(self._heartbeat_loop())]
                if self.keys is not None:
                    self._spawn(self._watch_refusals(ep))
                self._session_tasks = session
                await self._hello()
                await asyncio.wait({*session, stop}, return_when=asyncio.FIRST_COMPLETED)
                if stop.done():
                    return  # the session stays up for shutdown's job events and bye
                for task in session:
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        self.log.error("connection task failed", exc_info=task.exception())
                if self.welcomed.is_set():
                    delay = BACKOFF_MIN
                await self._disconnect()
                self.log.warning("broker lost: reconnecting", in_s=delay)
                await asyncio.wait({stop}, timeout=delay)
                if stop.done():
                    return
                delay = min(delay * 2, BACKOFF_MAX)
        finally:
            stop.cancel()

    async def shutdown(self, deadline: float) -> None:
        """Stop the scripts (end_job, grace, TERM, KILL), say bye, close; bounded by ``deadline`` seconds."""
        self.log.info("site shutting down", jobs=sorted(self.runners))
        runners = list(self.runners.values())
        if self.lifecycle.force_exit:
            for r in runners:
                r.kill()
        try:
            async with asyncio.timeout(deadline):
                await asyncio.gather(*(r.end("the site is shutting down") for r in runners))
                await asyncio.gather(*(r.done.wait() for r in runners))
                await self.uplink.drain(1.0)
        except TimeoutError:
            self.log.warning("shutdown deadline passed: killing what is left")
            for r in runners:
                r.kill()
        if self.uplink.ep is not None:
            with contextlib.suppress(FedbusError, TimeoutError):
                await asyncio.wait_for(self.uplink.send(Bye("site shutting down")), 1.0)
        for task in self._session_tasks:
            task.cancel()
        await asyncio.gather(*self._session_tasks, return_exceptions=True)
        await self.background.cancel()
        await self.uplink.close()
        self.audit.close()
        self._release_ctx()
        self.log.info("site stopped")

    # --- the connection -------------------------------------------------------------------------------

    def _lanes(self) -> int:
        """``stream_lanes``, except in process (SimEnv's ``inproc://``): messages there are handed over, not
        copied by I/O threads, so a lane would only make the broker put chunks back in order."""
        return 1 if self.config.broker.startswith("inproc://") else stream_lanes()

    def _connect(self) -> DealerEndpoint:
        identity = f"site:{self.name}"
        if self.keys is not None:  # unguessable, so that no other key can take over this site's route
            identity += f":{self.keys.routing_token()}"
        curve = self.keys.as_tuple() if self.keys is not None else None
        ep = DealerEndpoint.connect(
            self.ctx, self.config.broker, identity=identity.encode(), curve=curve, lanes=self._lanes()
        )
        self.uplink.attach(ep)
        self._last_heard = asyncio.get_running_loop().time()
        return ep

    async def _disconnect(self) -> None:
        for task in self._session_tasks:
            task.cancel()
        await asyncio.gather(*self._session_tasks, return_exceptions=True)
        self.uplink.detach()

    async def _watch_refusals(self, ep: DealerEndpoint) -> None:
        """Say why the broker refuses our key (libzmq only retries, silently); ends with the socket."""
        while self.uplink.ep is ep:
            try:
                reason = await handshake_refused(ep.sock)
            except TransportError:  # the socket was closed: a reconnect starts a new watch
                return
            self.log.error("the broker refused this site's key", reason=reason, broker=self.config.broker)
            self.audit.record("connection_refused", by="broker", reason=reason)

    async def _hello(self) -> None:
        self.welcomed.clear()
        self._hello_at = asyncio.get_running_loop().time()
        self.hellos += 1
        caps = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
        holds = held_tasks(self.workspace / "jobs", MAX_HELD)
        jobs = sorted({*self.runners, *held_jobs(self.workspace / "jobs")})[:MAX_HELD]
        self._broker_session = None  # until the welcome: a verdict of no session is not acted on
        await self._send(Hello(role="site", name=self.name, session=self.session, caps=caps, holds=holds, jobs=jobs))

    async def _send(self, msg: Message) -> None:
        try:
            await self.uplink.send(msg)
        except TransportError as exc:
            self.log.warning("cannot send to the broker", type=msg.TYPE, reason=str(exc))

    async def _receive_loop(self, ep: DealerEndpoint) -> None:
        """The one reader of the socket (``fedbus.daemon.answer_messages``); returns when the broker said bye.
        Silence is the heartbeat loop's business (cancelling this task then loses nothing of value)."""
        with contextlib.suppress(_BrokerLeft):
            await answer_messages(ep, self._on_broker, self._refuse, answered=(FedbusError, OSError))

    async def _refuse(self, peer: bytes, inc: Incoming | None, exc: Exception) -> None:
        if inc is None:
            self._last_heard = asyncio.get_running_loop().time()  # any message is a sign of life
            self.log.warning("invalid message from the broker", reason=str(exc))
            await self._send(Error("bad_message", str(exc)[:500]))
            return
        self.log.warning("broker message refused", type=inc.msg.TYPE, reason=str(exc))
        self.audit.record("refused", by="broker", type=inc.msg.TYPE, reason=str(exc))
        await self._send(Error("refused", str(exc)[:500], inc.msg.TYPE))

    async def _heartbeat_loop(self) -> None:
        """Heartbeat while welcomed, when one is due (``fedbus.protocol.liveness``); return once the broker has
        been silent for heartbeat_s x liveness."""
        loop = asyncio.get_running_loop()
        while True:
            due = heartbeat_due_in(self.uplink.sent_at, self._last_heard, self._heartbeat_s, loop.time())
            await asyncio.sleep(due if due > 0 else self._heartbeat_s)
            expiry = self._heartbeat_s * self._liveness
            if loop.time() - self._last_heard >= expiry:
                self.log.warning("broker silent", for_s=round(expiry, 3))
                return
            due = heartbeat_due_in(self.uplink.sent_at, self._last_heard, self._heartbeat_s, loop.time())
            if self.welcomed.is_set() and due <= 0:
                await self._send(Heartbeat())

    # --- messages from the broker ---------------------------------------------------------------------

    async def _on_broker(self, inc: Incoming) -> None:
        self._last_heard = asyncio.get_running_loop().time()  # any message is a sign of life
        msg = inc.msg
        if msg.TYPE in STREAM_TYPES:
            await self.uplink.hub.dispatch(b"", msg, inc.payload)
        elif isinstance(msg, Welcome):
            await self._welcome(msg)
        elif isinstance(msg, Heartbeat):
            pass
        elif isinstance(msg, Error):
            await self._error(msg)
        elif isinstance(msg, Bye):
            self.log.warning("the broker said bye", reason=msg.reason[:200])
            raise _BrokerLeft
        elif isinstance(msg, Deploy):
            self._deploy(msg, inc.payload)
        elif isinstance(msg, Task):
            runner = self._runner(msg.job_id, msg.TYPE)
            why = await runner.on_task(msg)
            if why is not None:
                raise RemoteProtocolError(f"task {msg.task_id[:80]!r}: {why}")
        elif isinstance(msg, SECAGG_TO_SITE):  # secure aggregation: the job's round at this site
            await self._runner(msg.job_id, msg.TYPE).on_secagg(msg)
        elif isinstance(msg, EndJob):
            if msg.cause:
                self._drop(msg)
                return
            ending = self.runners.get(msg.job_id)
            if ending is None:  # its script already ended here: nothing left to stop
                self.log.info("end_job for a job not running here", job=msg.job_id[:80])
                return
            ending.log.info("job ended by the broker", reason=msg.reason[:200])
            self._spawn(ending.end(msg.reason))
        else:
            raise RemoteProtocolError(f"a broker may not send {msg.TYPE!r} to a site")

    async def _welcome(self, msg: Welcome) -> None:
        if 0 < msg.heartbeat_s <= 3600 and 1 <= msg.liveness <= 1000:
            self._heartbeat_s, self._liveness = msg.heartbeat_s, msg.liveness
        self._broker_session = msg.session
        self.welcomed.set()
        self.log.info("welcomed by the broker", broker_session=msg.session[:64], heartbeat_s=self._heartbeat_s)
        await self.uplink.hub.resume_all()
        await self.uplink.hub.reoffer_all()  # our uploads: resumed by the same broker, refused by a new one

    async def _error(self, msg: Error) -> None:
        self.log.warning("the broker refused a message", code=msg.code[:64], reason=msg.reason[:500], ref=msg.ref[:32])
        # After a broker restart every message we send draws hello_required; one hello per heartbeat is plenty.
        since = asyncio.get_running_loop().time() - self._hello_at
        if msg.code == "hello_required" and since >= min(1.0, self._heartbeat_s):
            await self._hello()

    def _drop(self, msg: EndJob) -> None:
        """The broker does not run this job here (``EndJob.cause``): its script is stopped and what the site kept of
        it (uploads it would resume) is removed, as nothing will take them; said in the log and the audit. Acted
        on only when it comes from the broker session that welcomed this site: a verdict of another broker
        process, or one that raced a new hello, is ignored (the next hello asks again)."""
        job_id = msg.job_id
        if msg.cause not in END_CAUSES or not is_safe_name(job_id):
            raise RemoteProtocolError(f"end_job: cause {msg.cause[:32]!r} for job {job_id[:80]!r} is not valid")
        if self._broker_session is None or msg.session != self._broker_session:
            self.log.warning(
                "end_job from another broker session ignored", job=job_id, cause=msg.cause, session=msg.session[:64]
            )
            return
        runner = self.runners.get(job_id)
        if runner is None and not any((self.workspace / "jobs" / job_id / "uploads").glob("*.result")):
            self.log.info("end_job for a job not held here", job=job_id, cause=msg.cause)  # dropped already
            return
        if runner is not None and runner.stopping and msg.cause == "ended":  # a result that trailed its end_job
            self.log.info("end_job for a job ending here already", job=job_id, cause=msg.cause)
            return
        self.log.warning(
            "the broker does not run this job here: dropping it",
            job=job_id,
            cause=msg.cause,
            reason=msg.reason[:300],
            script_running=runner is not None,
        )
        self.audit.record("job_dropped", job=job_id, site=self.name, cause=msg.cause, reason=msg.reason[:300])
        self._spawn(self._forget(job_id, runner, msg))

    async def _forget(self, job_id: str, runner: JobRunner | None, msg: EndJob) -> None:
        """Stop the job's script (when it runs) and remove the uploads the site kept of it."""
        if runner is not None:
            # A broker that never knew the job takes nothing of it: no grace for a last result, no events.
            unknown = msg.cause == "unknown"
            await runner.end(msg.reason, report=not unknown, grace=0.0 if unknown else None)
            await runner.done.wait()
        if self.runners.get(job_id) in (None, runner):  # not deployed again meanwhile
            await asyncio.to_thread(PendingUploads(self.workspace / "jobs" / job_id, max_total=0).clear)
            self.log.info("job dropped", job=job_id, cause=msg.cause)

    def _deploy(self, msg: Deploy, payload: list[memoryview]) -> None:
        if not is_safe_name(msg.job_id):
            raise RemoteProtocolError(f"job id {msg.job_id[:80]!r} is not a safe name")
        if msg.job_id in self.runners:
            self.log.info("job already running here: repeated deploy ignored", job=msg.job_id)
            return
        if len(payload) != 1:
            raise RemoteProtocolError(f"deploy needs one payload frame (the job archive), got {len(payload)}")
        runner = JobRunner(
            msg,
            root=self.workspace / "jobs" / msg.job_id,
            settings=self.settings,
            bus=self.uplink,
            ctx=self.ctx,
            filters=self.filters,
            log=self.log,
            audit=self.audit,
        )
        runner.folder.prepare()
        self.runners[msg.job_id] = runner
        runner.log.info("job deployed", script=msg.script[:200])
        self.audit.record("job_deployed", job=msg.job_id, site=self.name, size=len(payload[0]))
        task = self.background.spawn(runner.run(bytes(payload[0])))
        task.add_done_callback(lambda t: self._runner_done(msg.job_id, runner, t))

    def _runner_done(self, job_id: str, runner: JobRunner, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            runner.log.error("job runner failed", exc_info=task.exception())
        if self.runners.get(job_id) is runner:
            del self.runners[job_id]

    def _runner(self, job_id: str, what: str) -> JobRunner:
        runner = self.runners.get(job_id)
        if runner is None:
            raise RemoteProtocolError(f"{what} for job {job_id[:80]!r}, which is not running here")
        return runner

    async def _on_offer(self, peer: bytes, offer: Offer) -> BufferSink | None:
        job_id = offer.route.get("job_id")
        runner = self.runners.get(job_id) if isinstance(job_id, str) else None
        sink = runner.accept_offer(offer) if runner is not None else None
        if sink is None:
            self.log.warning("model stream refused: no such task here", sid=offer.sid, route=str(offer.route)[:200])
        return sink

    def _spawn(self, coro: Any) -> None:
        self.background.spawn(coro)
