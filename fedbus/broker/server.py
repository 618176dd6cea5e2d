"""The broker daemon: one ROUTER socket, the site registry, the job store and a controller per job.

``Broker`` owns the daemon's life and its receive loop, and wires the parts that do the work, each the one owner
of its concern: ``Outbox`` (what goes out), ``AdminRequests`` (submit, status, abort, download),
``JobLauncher`` (starting jobs, deploying them to their sites, a controller per running job) and ``Uploads``
(incoming model streams). Life cycle: ``fedbus.daemon.Lifecycle`` (``run()`` → ``serve()`` → ``startup()`` /
``main_loop()`` / ``shutdown(deadline)``). Shutdown tells sites and admins nothing (they notice the silence and
reconnect to the next broker on this workspace), closes the socket, and cancels what is left after a deadline;
a second signal exits at once. Every message is untrusted: it is metered before any work and a refusal is
logged with the peer's identity and answered with ``error``, once per burst (``fedbus.broker.meter``); the loop
keeps serving, and no peer can hold it: a send never waits on a peer (``fedbus.transport.overflow``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedbus.broker.admin_requests import AdminRequests
from fedbus.broker.controller import JobController
from fedbus.broker.guard import Guard
from fedbus.broker.launcher import JobLauncher
from fedbus.broker.meter import Meter
from fedbus.broker.metrics import CountingEndpoint, Metrics, MetricsServer, health, render
from fedbus.broker.outbox import Outbox
from fedbus.broker.registry import Registry, held_job_verdict
from fedbus.broker.store import ACTIVE_STATES, JobStore
from fedbus.broker.store_gate import StoreGate
from fedbus.broker.tracking import Tracking, check_lines, check_record
from fedbus.broker.uploads import Uploads
from fedbus.config import BrokerConfig, is_safe_name
from fedbus.daemon import Background, Lifecycle, answer_messages, loop_now, owned_context
from fedbus.errors import FedbusError, PeerError, PeerUnreachable, TransportError
from fedbus.he.context import load_broker_context
from fedbus.log import get_logger
from fedbus.protocol.messages import (
    MAX_HELD,
    SECAGG_TO_BROKER,
    STREAM_TYPES,
    Bye,
    End,
    EndJob,
    Heartbeat,
    Hello,
    JobEvent,
    Message,
    Request,
    Result,
    Welcome,
)
from fedbus.transport.context import Context
from fedbus.transport.endpoint import Incoming, RouterEndpoint, io_threads
from fedbus.transport.placement import placement_threads
from fedbus.transport.streams import StreamHub

MiB = 1 << 20
SHUTDOWN_DEADLINE_S = 5.0
log = get_logger("broker")


class Broker:
    """The broker daemon; ``run()`` blocks (the CLI); ``async with Broker(cfg) as b`` serves in the background."""

    def __init__(
        self, config: BrokerConfig, *, ctx: Context | None = None, endpoint_wrapper: Callable[[Any], Any] | None = None
    ) -> None:
        """``endpoint_wrapper``: the simulator's seam, given the bound socket's endpoint and returning the endpoint
        the broker serves (``fedbus.recipes.simtime``: the socket for admins, an in-process hub for the sites)."""
        self.config = config
        self.endpoint_wrapper = endpoint_wrapper
        self.guard = Guard(config, Path(config.workspace))
        if config.he_context is not None:  # checked at start, as the CURVE keys: keyless, no secret beside it
            load_broker_context(config.he_context)
        # A secure broker gets a zmq context of its own unless given one: ZAP is one handler per context.
        self.ctx, self._release_ctx = owned_context(ctx, server=True, shared=not self.guard.secure)
        self.session = os.urandom(8).hex()
        self.registry = Registry(config.heartbeat_s, config.liveness)
        self.store = JobStore(config.workspace, durability=config.durability)
        self.meter = Meter(config, self.guard, answer=self._answer, holds=self._holds)
        self.limits = self.meter.limits
        self.metrics = Metrics(board_dir=lambda job_id: self.store.job_dir(job_id) / "tensorboard")
        self.tracking = self.metrics.tracking = Tracking(
            self.store.job_dir, self.store.job, self.store.history, self.metrics.boards
        )
        self.background = Background()
        self.outbox = Outbox(self.registry, self.guard, self.metrics)
        # The running jobs' controllers, by job id: the launcher adds and removes them, the others look them up.
        self.controllers: dict[str, JobController] = {}
        self.uploads = Uploads(
            config,
            self.store,
            controllers=self.controllers,
            limits=self.limits,
            metrics=self.metrics,
            audit=self.guard.audit,
            outbox=self.outbox,
            spawn=self.background.spawn,
            on_job_ready=self._start_waiting_jobs,
        )
        self.launcher = JobLauncher(
            config,
            self.store,
            self.registry,
            outbox=self.outbox,
            metrics=self.metrics,
            controllers=self.controllers,
            upload_slots=self.uploads.slots,
            spawn=self.background.spawn,
        )
        self.admin = AdminRequests(
            config,
            self.store,
            self.registry,
            guard=self.guard,
            outbox=self.outbox,
            controllers=self.controllers,
            uploads=self.uploads,
            spawn=self.background.spawn,
            on_submitted=self._start_waiting_jobs,
        )
        self.store_gate = StoreGate(
            config, self.store, outbox=self.outbox, guard=self.guard, spawn=self.background.spawn
        )
        self.lifecycle = Lifecycle(self, shutdown_deadline=SHUTDOWN_DEADLINE_S, on_force_exit=lambda: os._exit(1))
        self.endpoint: CountingEndpoint | None = None
        self.router: RouterEndpoint | None = None
        self.hub: StreamHub | None = None
        self.metrics_server: MetricsServer | None = None
        self._rebound: set[bytes] = set()  # site peers not heard from since the last rebind

    @property
    def address(self) -> str:
        assert self.endpoint is not None
        return self.endpoint.address

    # --- life cycle ------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Blocking entry point for the CLI: serve until SIGINT/SIGTERM."""
        self.lifecycle.run()

    async def __aenter__(self) -> Broker:
        await self.lifecycle.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.lifecycle.__aexit__(*exc)

    async def startup(self) -> None:
        self.guard.start(self.ctx)  # ZAP first: libzmq asks it about every CURVE connection
        try:
            self.router = RouterEndpoint.bind(
                self.ctx,
                self.config.bind,
                curve_secret=self.guard.secret,
                hwm=self.config.peer_queue,
                stuck_after=self.config.stuck_peer_s,
                cooldown=self.config.stuck_peer_cooldown_s,
            )
            self.router.on_stuck = self._on_stuck
            self.meter.shed = self.router.cut
            self.meter.dropped = self.router.take_dropped
        except TransportError:  # e.g. the port is taken: free what startup took, so a retry can start clean
            self.guard.close()
            self._release_ctx()
            raise
        for coro in self.guard.tasks(self.router.sock):
            self.background.spawn(coro)
        inner = self.router if self.endpoint_wrapper is None else self.endpoint_wrapper(self.router)
        self.endpoint = CountingEndpoint(inner, self.metrics)
        self.hub = StreamHub(
            self.endpoint,
            on_offer=self.uploads.on_offer,
            chunk_size=int(self.config.chunk_mb * MiB),
            window=self.uploads.window,
            max_total=int(self.config.max_model_mb * MiB),
            stall_timeout=self.config.stall_timeout_s,
        )
        self.outbox.attach(self.endpoint, self.hub)
        self._resume_jobs()
        if self.config.metrics_port:
            self.metrics_server = MetricsServer(
                lambda: render(self.metrics, self),
                self.config.metrics_host,
                self.config.metrics_port,
                health=lambda: health(self.store.faults, time.time()),
            )
            try:
                await self.metrics_server.start()
            except OSError as exc:
                await self.shutdown()  # what startup opened so far (socket, tasks, store) is closed again
                raise TransportError(
                    f"cannot serve metrics on {self.config.metrics_host}:{self.config.metrics_port}: {exc}"
                ) from exc
        log.info(
            "broker listening",
            address=self.address,
            workspace=str(self.store.root),
            session=self.session,
            curve=self.config.secret_key is not None,
            placement_threads=placement_threads(),
            io_threads=io_threads(server=True),
        )

    def _resume_jobs(self) -> None:
        """The jobs a previous broker on this workspace left active wait to start again (or fail, mid-upload)."""
        for job in self.store.jobs(ACTIVE_STATES):
            if job["state"] == "uploading":  # its submitter was cut off mid-upload
                self.store.set_state(job["id"], "failed", "the initial model upload did not complete")
                continue
            unapplied = self.store.unapply_after(job["id"], job["version"])
            for part in (self.store.job_dir(job["id"]) / "incoming").glob("*.part"):
                part.unlink(missing_ok=True)  # uploads the dead broker was receiving: their sites resend or drop
            log.info("job will resume", job=job["id"], version=job["version"], updates_lost_in_aggregate=unapplied)
            self.store.set_state(job["id"], "waiting", "resuming after a broker restart")

    async def main_loop(self) -> None:
        assert self.endpoint is not None
        receiver = asyncio.ensure_future(
            answer_messages(self.endpoint, self._on_message, self._refuse, answered=(Exception,))
        )
        sweeper = asyncio.ensure_future(self._liveness_loop())
        stopper = asyncio.ensure_future(self.lifecycle.should_exit.wait())
        try:
            done, _ = await asyncio.wait({receiver, sweeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in (receiver, sweeper, stopper):
                task.cancel()
            await asyncio.gather(receiver, sweeper, stopper, return_exceptions=True)

    async def shutdown(self, deadline: float = SHUTDOWN_DEADLINE_S) -> None:
        log.info("shutting down")
        await self.launcher.close()
        if self.hub is not None:
            await self.hub.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        self.metrics.close()
        self.meter.report(final=True)
        await self.background.cancel(deadline)
        if self.endpoint is not None:
            self.endpoint.close()
        self.guard.close()
        self._release_ctx()
        self.store.close()
        log.info("broker stopped")

    async def _start_waiting_jobs(self) -> None:
        await self.launcher.start_waiting_jobs()

    # --- the receive loop ---------------------------------------------------------------------------------------

    async def _on_message(self, inc: Incoming) -> None:
        """One message from the socket: metered, then past the keys' rules, then handled."""
        if not await self.meter.admit(inc.peer, inc.user, inc.msg, inc.size):
            return
        refusal = self.guard.refusal(inc)
        if refusal is not None:
            await self._unauthorized(inc, refusal)
            return
        await self._handle(inc.peer, inc.msg, inc.payload, inc.user)

    async def _refuse(self, peer: bytes, inc: Incoming | None, exc: Exception) -> None:
        """A message that could not be decoded or handled: the peer hears why (once per burst); a bug costs one
        message."""
        if inc is None:
            user, size = getattr(exc, "user", ""), getattr(exc, "size", 0)
            if await self.meter.admit(peer, user, None, size):
                await self.meter.refuse(peer, user, "bad_message", str(exc))
        elif isinstance(exc, PeerUnreachable):  # our answer found the peer reconnecting or not reading
            log.debug("answer lost: the peer is reconnecting", peer=peer, type=inc.msg.TYPE, reason=str(exc))
        elif isinstance(exc, FedbusError):
            await self.meter.refuse(peer, inc.user, "refused", str(exc), inc.msg.TYPE)
        else:
            reason = "the broker failed to handle this message"
            if await self.meter.refuse(peer, inc.user, "internal", reason, inc.msg.TYPE, error=repr(exc)[:300]):
                log.error("message handler failed", peer=peer, type=inc.msg.TYPE, exc_info=exc)

    async def _answer(self, peer: bytes, code: str, reason: str, ref: str) -> None:
        await self.outbox.send_error(peer, code, reason, ref)

    def _holds(self, peer: bytes, sid: int) -> bool:
        return self.hub is not None and self.hub.holds(peer, sid)

    def _on_stuck(self, peer: bytes) -> None:
        """The ROUTER cut ``peer`` off (its queue stayed full): forget it, on the loop, after the send that found it."""
        asyncio.get_running_loop().call_soon(self._cut_off, peer)

    def _cut_off(self, peer: bytes) -> None:
        why = f"it did not read: its queue stayed full for {self.config.stuck_peer_s:g} s"
        self.meter.cut_off(peer, why)
        self.registry.admins.discard(peer)
        if self.hub is not None:
            self.hub.abort_peer(peer, f"cut off: {why}")
        self._site_gone(peer, f"cut off: {why}")

    async def _handle(self, peer: bytes, msg: Message, payload: list[memoryview], user: str = "") -> None:
        now = loop_now()
        if isinstance(msg, Hello):
            await self._hello(peer, msg, now, user)
            return
        if isinstance(msg, Request):
            if peer not in self.registry.admins:
                raise PeerError(user or peer.hex(), "say hello as an admin before sending requests")
            await self.admin.request(peer, msg, payload, user)
            return
        if msg.TYPE in STREAM_TYPES:
            assert self.hub is not None
            # A site's stream traffic counts as a sign of life: it skips heartbeats while it sends.
            if self.registry.seen(peer, now) is None and peer not in self.registry.admins:
                await self.meter.refuse(peer, user, "hello_required", "say hello first", msg.TYPE)
                return
            if isinstance(msg, End) and self.registry.by_peer(peer) is not None:  # a site's: the audit's digest
                self.uploads.note_end(peer, msg)
            await self.hub.dispatch(peer, msg, payload)
            return
        site = self.registry.seen(peer, now)
        if site is None:
            await self.meter.refuse(peer, user, "hello_required", "unknown peer: say hello first", msg.TYPE)
            return
        if peer in self._rebound:  # back after a rebind: what was in flight is lost, so resume streams now
            self._rebound.discard(peer)
            await self.outbox.send(peer, Welcome(self.session, self.config.heartbeat_s, self.config.liveness))
            assert self.hub is not None
            await self.hub.resume_all(peer)
        if isinstance(msg, Heartbeat):
            await self.outbox.send(peer, Heartbeat())
        elif isinstance(msg, Bye):
            self._site_gone(peer, msg.reason or "said bye")
        elif isinstance(msg, Result):
            if not await self._end_if_not_here(peer, site.name, msg.job_id):
                self.launcher.controller(msg.job_id, site.name).on_result(peer, site.name, msg)
        elif isinstance(msg, JobEvent):
            # Events trail a job's end and are recorded then; only a job unknown here is ended by one.
            if msg.event not in ("exited", "crashed") and await self._end_if_not_here(
                peer, site.name, msg.job_id, causes=("unknown",)
            ):
                return
            self._job_event(site.name, msg)
        elif isinstance(msg, SECAGG_TO_BROKER):  # secure aggregation: for the job's strategy
            self.launcher.controller(msg.job_id, site.name).on_message(site.name, msg)
        else:
            raise PeerError(site.name, f"unexpected message type {msg.TYPE!r} from a site")

    async def _unauthorized(self, inc: Incoming, reason: str) -> None:
        """A message the keys do not allow: refused and audited (once per burst), and a site record it claimed is
        dropped."""
        if self.registry.by_peer(inc.peer) is not None:  # revoked, or its route taken over: gone either way
            self._site_gone(inc.peer, reason)
        await self.meter.refuse(inc.peer, inc.user, "unauthorized", reason, inc.msg.TYPE)

    async def _revoke(self, names: list[str]) -> None:
        """Keys just revoked: their sites are gone now, and every connection is closed so that each peer
        passes ZAP again (libzmq cannot close one peer of a ROUTER); the revoked ones cannot come back."""
        for name in names:
            peer = self.registry.peer_of(name)
            if peer is not None:
                with contextlib.suppress(FedbusError):
                    await self.outbox.send(peer, Bye("key revoked"))
                self._site_gone(peer, "key revoked")
        self.admin.forget(names)
        if self.router is None or not self.router.address.startswith("tcp://"):
            log.warning("revoked keys keep their open connections (only refused): rebind needs tcp", names=names)
            return
        await self.router.rebind()
        for coro in self.guard.tasks(self.router.sock, zap=False):  # the handshake watcher of the new socket
            self.background.spawn(coro)
        self._rebound = {p for p in (self.registry.peer_of(n) for n in self.registry.online()) if p is not None}
        log.warning("connections closed after a revocation: peers reconnect", revoked=names)

    async def _hello(self, peer: bytes, msg: Hello, now: float, user: str = "") -> None:
        refusal = self.guard.hello_refusal(user, msg)
        if refusal is not None:
            raise PeerError(user or msg.name[:64], refusal)
        self.guard.audit.record("hello", by=user or msg.name[:64], key=self.guard.key_of(user), role=msg.role[:16])
        if msg.role == "admin":
            self.admin.welcome(peer, user or msg.name[:64])
        elif msg.role == "site":
            if not is_safe_name(msg.name):
                raise PeerError(user or peer.hex(), f"invalid site name {msg.name[:64]!r}")
            holds = check_holds(msg.holds, msg.name)
            held_jobs = check_holds(msg.jobs, msg.name, "job")
            _, arrival = self.registry.hello(peer, msg.name, msg.session, msg.caps, now)
            log.info("site registered", site=msg.name, arrival=arrival, holds=len(holds), jobs=len(held_jobs))
        else:
            raise PeerError(user or msg.name[:64], f"unknown role {msg.role[:32]!r}")
        await self.outbox.send(peer, Welcome(self.session, self.config.heartbeat_s, self.config.liveness))
        if msg.role == "site":
            for job_id in sorted(held_jobs):
                await self._end_if_not_here(peer, msg.name, job_id)
            await self.launcher.site_arrived(peer, msg.name, arrival, holds)

    async def _end_if_not_here(
        self, peer: bytes, site: str, job_id: str, causes: tuple[str, ...] = ("unknown", "ended")
    ) -> bool:
        """A site named ``job_id``: when the store says it does not run there (``registry.held_job_verdict``, for
        one of ``causes``), the site is told to end it (``end_job`` with the cause and the broker's session id):
        True."""
        verdict = held_job_verdict(job_id, self.store.job_standing(job_id), site)
        if verdict is None or verdict[0] not in causes:
            return False
        cause, reason = verdict
        say = log.warning if cause == "unknown" else log.info  # results trailing a job's end are routine
        say("a site holds a job the broker does not run there: ending it", site=site, job=job_id, cause=cause)
        await self.outbox.send(peer, EndJob(job_id, reason, cause=cause, session=self.session))
        return True

    async def _liveness_loop(self) -> None:
        """Declare silent sites gone; runs at the heartbeat period (the liveness clock, not a data poll).

        Silence is judged only up to the moment the receive loop last had nothing unread: after the loop was
        held up (a long fold, a checkpoint, a busy machine), heartbeats may sit in the socket, and a sweep
        that ran first would expire every site at once (as when many sites import torch on a small machine)."""
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            assert self.endpoint is not None
            backlogged = self.endpoint.backlogged()  # then silence counts only up to when nothing was unread
            seen_until = self.endpoint.drained_at if backlogged else loop_now()
            for rec in self.registry.expire(seen_until):
                self._site_gone(rec.peer, "heartbeat timeout", rec.name)
            self.meter.report()
            revoked = self.guard.revoked_now()
            if revoked:
                await self._revoke(revoked)

    def _site_gone(self, peer: bytes, why: str, name: str | None = None) -> None:
        rec = self.registry.leave(peer)
        if self.hub is not None:  # its uploads cannot resume any more: their owners hear it now
            self.hub.abort_peer(peer, f"site gone: {why}")
        name = name or (rec.name if rec else None)
        if name is None:
            return
        (log.info if why == "said bye" or "shutting down" in why else log.warning)("site gone", site=name, reason=why)
        self.launcher.site_left(name, why)

    def _job_event(self, site: str, msg: JobEvent) -> None:
        """Script events are recorded for any job the site took part in (they may trail the job's end).

        ``log`` records are checked (``tracking.check_record``) and, when the job names ``[tracking] types``, go
        to its tracking stores too; ``log_text`` lines (the script's output) go to ``<job>/logs/<site>.log``
        only, never into the store."""
        job = self.store.job(msg.job_id)
        if job is None or site not in job["sites"]:
            raise PeerError(site, f"an event of job {msg.job_id[:80]!r}, which this site never ran")
        keep = self.store_gate.admit(msg.job_id, site, msg)  # False: over its byte budgets (the site was told)
        if msg.event == "log_text":
            lines, dropped = check_lines(msg.data)
            if keep:
                self.tracking.lines(msg.job_id, site, lines, dropped)
            return
        if msg.event == "log":
            rec = check_record(msg.data)
            if keep and self.tracking.wants_records(job):
                self.tracking.record(msg.job_id, site, rec)
        data = {"code": msg.code, "detail": msg.detail[:2000], **msg.data}
        if keep:
            self.store.record_event(msg.job_id, site, msg.event, data)
        c = self.controllers.get(msg.job_id)
        if c is not None and msg.event in ("crashed", "exited") and c.state == "running":
            log.warning("script ended", job=msg.job_id, site=site, outcome=msg.event, code=msg.code)
            c.site_crashed(site, f"{msg.event} with code {msg.code}: {msg.detail[-300:]}")


def check_holds(holds: list, site: str, what: str = "task") -> frozenset[str]:
    """A site's ``hello.holds`` (or ``hello.jobs``, ``what="job"``), checked: at most ``MAX_HELD`` ids, each a safe
    name (else PeerError)."""
    if len(holds) > MAX_HELD:
        raise PeerError(site, f"hello names {len(holds)} held {what}s, more than {MAX_HELD}")
    for item in holds:
        if not is_safe_name(item):
            raise PeerError(site, f"hello names a held {what} that is not a {what} id: {str(item)[:80]!r}")
    return frozenset(holds)
