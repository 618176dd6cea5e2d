"""The broker daemon: one ROUTER socket, the site registry, the job store and a controller per job.

Life cycle (the uvicorn shape): ``run()`` → ``serve()`` → ``startup()`` / ``main_loop()`` /
``shutdown()``. Signal handlers only set the stop event; shutdown tells sites and admins nothing (they
notice the silence and reconnect to the next broker on this workspace), closes the socket, and cancels
what is left after a deadline. Every message is untrusted: a refusal is logged with the peer's identity
and answered with ``error``; the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import signal
import time
from pathlib import Path
from typing import Any

import msgpack

from fedbus import jobs
from fedbus._cores import usable_cores
from fedbus._memory import tune_malloc
from fedbus.broker.controller import InFlight, JobController
from fedbus.broker.guard import Guard, own_context
from fedbus.broker.limits import PeerLimits
from fedbus.broker.metrics import CountingEndpoint, Metrics, MetricsServer, render
from fedbus.broker.registry import Registry
from fedbus.broker.store import ACTIVE_STATES, JobStore
from fedbus.broker.tracking import BEST_MODEL, Tracking, best_version, check_lines, check_record, key_metric_of
from fedbus.config import BrokerConfig, is_safe_name
from fedbus.errors import ConfigError, FedbusError, PeerError, PeerUnreachable, TransportError
from fedbus.log import get_logger
from fedbus.modelio import serde
from fedbus.modelio.sinks import BufferSink
from fedbus.modelio.sources import ModelSource
from fedbus.modelio.spool import SpoolSink, open_params
from fedbus.protocol.messages import (
    MAX_HELD,
    STREAM_TYPES,
    Bye,
    Deploy,
    End,
    Error,
    Heartbeat,
    Hello,
    JobEvent,
    Message,
    Offer,
    Reply,
    Request,
    Result,
    Welcome,
)
from fedbus.strategy import Strategy, make_strategy
from fedbus.strategy.cross_site import CrossSiteEval
from fedbus.transport.context import Context
from fedbus.transport.endpoint import BadMessage, RouterEndpoint, io_threads
from fedbus.transport.placement import placement_threads
from fedbus.transport.streams import StreamHub

MiB = 1 << 20
REPLY_INLINE_MAX = 64 * 1024
MAX_END_DIGESTS = 4096
SERVER_MODELS = "cross_site_models"
"""The job folder's directory of extra server-side models for cross-site evaluation: ``NAME.safetensors`` is
evaluated by every site as model ``NAME`` (pre-trained models, as FLARE's NumpyCrossSiteEvalRecipe gives)."""
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


class Broker:
    """The broker daemon; ``async with Broker(cfg) as b`` serves in the background (tests, SimEnv)."""

    def __init__(self, config: BrokerConfig, *, ctx: Context | None = None) -> None:
        self.config = config
        self.guard = Guard(config, Path(config.workspace))
        self.ctx, self._release_ctx = own_context(self.guard, ctx)
        self.session = os.urandom(8).hex()
        self.registry = Registry(config.heartbeat_s, config.liveness)
        self.store = JobStore(config.workspace)
        self.controllers: dict[str, JobController] = {}
        slots = config.upload_slots or default_upload_slots()
        self.upload_slots = asyncio.Semaphore(slots)
        self.window = config.window_bytes or default_window(slots, config.chunk_bytes)
        self.limits = PeerLimits(config.max_requests_per_s, config.request_burst, config.max_streams_per_peer)
        self.stop = asyncio.Event()
        self.endpoint: RouterEndpoint | CountingEndpoint | None = None
        self.metrics = Metrics(board_dir=lambda job_id: self.store.job_dir(job_id) / "tensorboard")
        self.tracking = self.metrics.tracking = Tracking(
            self.store.job_dir, self.store.job, self.store.history, self.metrics.boards
        )
        self.metrics_server: MetricsServer | None = None
        self.hub: StreamHub | None = None
        self._tasks: set[asyncio.Task] = set()
        self._uploads: dict[str, tuple[bytes, int]] = {}  # job id -> (submitter, model size)
        self._end_digests: dict[tuple[bytes, int], str] = {}  # (peer, sid) -> the END digest (the audit's)
        self._admin_names: dict[bytes, str] = {}  # admin peer -> participant name (CURVE) or claimed name
        self._rebound: set[bytes] = set()  # site peers not heard from since the last rebind
        self.router: RouterEndpoint | None = None
        self._serving: asyncio.Task | None = None
        self.started = asyncio.Event()

    @property
    def address(self) -> str:
        assert self.endpoint is not None
        return self.endpoint.address

    # --- life cycle ------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Blocking entry point for the CLI: serve until SIGINT/SIGTERM. The process is the daemon's own, so its
        allocator is tuned for it (not when a daemon runs inside someone else's process: SimEnv, tests)."""
        tune_malloc()
        asyncio.run(self.serve(install_signals=True))

    async def serve(self, *, install_signals: bool = False) -> None:
        await self.startup()
        if install_signals:
            self._install_signals()
        try:
            await self.main_loop()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        self.guard.start(self.ctx)  # ZAP first: libzmq asks it about every CURVE connection
        try:
            self.router = RouterEndpoint.bind(self.ctx, self.config.bind, curve_secret=self.guard.secret)
        except TransportError:  # e.g. the port is taken: free what startup took, so a retry can start clean
            self.guard.close()
            self._release_ctx()
            raise
        for coro in self.guard.tasks(self.router.sock):
            self._spawn(coro)
        self.endpoint = CountingEndpoint(self.router, self.metrics)
        self.hub = StreamHub(
            self.endpoint,
            on_offer=self._on_offer,
            chunk_size=int(self.config.chunk_mb * MiB),
            window=self.window,
            max_total=int(self.config.max_model_mb * MiB),
            stall_timeout=self.config.stall_timeout_s,
        )
        for job in self.store.jobs(ACTIVE_STATES):
            if job["state"] == "uploading":  # its submitter was cut off mid-upload
                self.store.set_state(job["id"], "failed", "the initial model upload did not complete")
                continue
            unapplied = self.store.unapply_after(job["id"], job["version"])
            for part in (self.store.job_dir(job["id"]) / "incoming").glob("*.part"):
                part.unlink(missing_ok=True)  # uploads the dead broker was receiving: their sites resend or drop
            log.info("job will resume", job=job["id"], version=job["version"], updates_lost_in_aggregate=unapplied)
            self.store.set_state(job["id"], "waiting", "resuming after a broker restart")
        if self.config.metrics_port:
            self.metrics_server = MetricsServer(
                lambda: render(self.metrics, self), self.config.metrics_host, self.config.metrics_port
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
            placement_threads=placement_threads(),
            io_threads=io_threads(server=True),
        )
        self.started.set()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        hits = 0

        def handle() -> None:
            nonlocal hits
            hits += 1
            if hits > 1:
                os._exit(1)  # a second Ctrl-C means now
            log.info("shutting down")
            self.stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, handle)

    async def main_loop(self) -> None:
        receiver = asyncio.ensure_future(self._receive_loop())
        sweeper = asyncio.ensure_future(self._liveness_loop())
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            done, _ = await asyncio.wait({receiver, sweeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in (receiver, sweeper, stopper):
                task.cancel()
            await asyncio.gather(receiver, sweeper, stopper, return_exceptions=True)

    async def shutdown(self, deadline: float = 5.0) -> None:
        for c in list(self.controllers.values()):
            await c.close()
        if self.hub is not None:
            await self.hub.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        self.metrics.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), deadline)
        if self.endpoint is not None:
            self.endpoint.close()
        self.guard.close()
        self._release_ctx()
        self.store.close()
        log.info("broker stopped")

    async def __aenter__(self) -> Broker:
        self._serving = asyncio.ensure_future(self.serve())
        started = asyncio.ensure_future(self.started.wait())
        await asyncio.wait({self._serving, started}, return_when=asyncio.FIRST_COMPLETED)
        if self._serving.done():
            started.cancel()
            self._serving.result()  # raises the startup error
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        if self._serving is not None:
            await self._serving

    # --- the receive loop ---------------------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self.endpoint is not None
        while True:
            try:
                inc = await self.endpoint.recv()
            except BadMessage as exc:
                if await self._admit(exc.peer, "bad_message"):
                    log.warning("bad message refused", peer=exc.peer, reason=str(exc))
                    await self._send_error(exc.peer, "bad_message", str(exc))
                continue
            if not await self._admit(inc.peer, inc.msg.TYPE):
                continue
            refusal = self.guard.refusal(inc)
            if refusal is not None:
                await self._unauthorized(inc, refusal)
                continue
            try:
                await self._handle(inc.peer, inc.msg, inc.payload, inc.user)
            except PeerUnreachable as exc:  # our answer found the peer reconnecting: not a refusal of its message
                log.debug("answer lost: the peer is reconnecting", peer=inc.peer, type=inc.msg.TYPE, reason=str(exc))
            except FedbusError as exc:
                log.warning("message refused", peer=inc.peer, type=inc.msg.TYPE, reason=str(exc))
                self.guard.refused(str(exc), peer=inc.peer, user=inc.user, type=inc.msg.TYPE)
                await self._send_error(inc.peer, "refused", str(exc), inc.msg.TYPE)
            except Exception:  # a bug must cost one message, never the daemon
                log.exception("message handler failed", peer=inc.peer, type=inc.msg.TYPE)
                await self._send_error(inc.peer, "internal", "the broker failed to handle this message", inc.msg.TYPE)

    async def _admit(self, peer: bytes, msg_type: str) -> bool:
        """The request-rate limit: a peer over it is told so once per burst and its messages are dropped."""
        if self.limits.admit(peer, msg_type, time.monotonic()):
            return True
        if self.limits.first_refusal(peer):
            rate = self.config.max_requests_per_s
            log.warning("peer over its request rate: refusing", peer=peer, type=msg_type[:32], limit_per_s=rate)
            await self._send_error(peer, "rate_limited", f"over {rate:g} requests/s: slow down", msg_type)
        return False

    async def _send_error(self, peer: bytes, code: str, reason: str, ref: str = "") -> None:
        self.guard.audit.flush()  # a refusal is in the trail before the peer hears of it
        with contextlib.suppress(FedbusError):
            await self._send(peer, Error(code=code, reason=reason[:500], ref=ref))

    async def _send(self, peer: bytes, msg: Message, payload: Any = ()) -> None:
        assert self.endpoint is not None
        await self.endpoint.send(peer, msg, payload)

    async def _handle(self, peer: bytes, msg: Message, payload: list[memoryview], user: str = "") -> None:
        now = time.monotonic()
        if isinstance(msg, Hello):
            await self._hello(peer, msg, now, user)
            return
        if isinstance(msg, Request):
            if peer not in self.registry.admins:
                raise PeerError(user or peer.hex(), "say hello as an admin before sending requests")
            await self._request(peer, msg, payload, user)
            return
        if msg.TYPE in STREAM_TYPES:
            assert self.hub is not None
            # A site's stream traffic counts as a sign of life: it skips heartbeats while it sends.
            if self.registry.seen(peer, now) is None and peer not in self.registry.admins:
                await self._send_error(peer, "hello_required", "say hello first", msg.TYPE)
                return
            if isinstance(msg, End) and self.registry.by_peer(peer) is not None:  # a site's: the audit's digest
                self._end_digests[(peer, msg.sid)] = msg.digest
                while len(self._end_digests) > MAX_END_DIGESTS:  # ENDs of refused streams are never collected
                    del self._end_digests[next(iter(self._end_digests))]
            await self.hub.dispatch(peer, msg, payload)
            return
        site = self.registry.seen(peer, now)
        if site is None:
            await self._send_error(peer, "hello_required", "unknown peer: say hello first", msg.TYPE)
            return
        if peer in self._rebound:  # back after a rebind: what was in flight is lost, so resume streams now
            self._rebound.discard(peer)
            await self._send(peer, Welcome(self.session, self.config.heartbeat_s, self.config.liveness))
            assert self.hub is not None
            await self.hub.resume_all(peer)
        if isinstance(msg, Heartbeat):
            await self._send(peer, Heartbeat())
        elif isinstance(msg, Bye):
            self._site_gone(peer, msg.reason or "said bye")
        elif isinstance(msg, Result):
            self._controller(msg.job_id, site.name).on_result(peer, site.name, msg)
        elif isinstance(msg, JobEvent):
            self._job_event(site.name, msg)
        else:
            raise PeerError(site.name, f"unexpected message type {msg.TYPE!r} from a site")

    async def _unauthorized(self, inc: Any, reason: str) -> None:
        """A message the keys do not allow: refused, audited, and a site record it claimed is dropped."""
        log.warning("message refused: not authorized", peer=inc.peer, user=inc.user, reason=reason)
        self.guard.refused(reason, peer=inc.peer, user=inc.user, type=inc.msg.TYPE)
        if self.registry.by_peer(inc.peer) is not None:  # revoked, or its route taken over: gone either way
            self._site_gone(inc.peer, reason)
        await self._send_error(inc.peer, "unauthorized", reason, inc.msg.TYPE)

    async def _revoke(self, names: list[str]) -> None:
        """Keys just revoked: their sites are gone now, and every connection is closed so that each peer
        passes ZAP again (libzmq cannot close one peer of a ROUTER); the revoked ones cannot come back."""
        for name in names:
            peer = self.registry.peer_of(name)
            if peer is not None:
                with contextlib.suppress(FedbusError):
                    await self._send(peer, Bye("key revoked"))
                self._site_gone(peer, "key revoked")
        for peer, who in list(self._admin_names.items()):
            if who in names:
                self.registry.admins.discard(peer)
                del self._admin_names[peer]
        if self.router is None or not self.router.address.startswith("tcp://"):
            log.warning("revoked keys keep their open connections (only refused): rebind needs tcp", names=names)
            return
        await self.router.rebind()
        for coro in self.guard.tasks(self.router.sock, zap=False):  # the handshake watcher of the new socket
            self._spawn(coro)
        self._rebound = {p for p in (self.registry.peer_of(n) for n in self.registry.online()) if p is not None}
        log.warning("connections closed after a revocation: peers reconnect", revoked=names)

    def _controller(self, job_id: str, site: str) -> JobController:
        c = self.controllers.get(job_id)
        if c is None or site not in c.sites:
            raise PeerError(site, f"job {job_id!r} is not running on this site")
        return c

    async def _hello(self, peer: bytes, msg: Hello, now: float, user: str = "") -> None:
        refusal = self.guard.hello_refusal(user, msg)
        if refusal is not None:
            raise PeerError(user or msg.name[:64], refusal)
        self.guard.audit.record("hello", by=user or msg.name[:64], key=self.guard.key_of(user), role=msg.role[:16])
        if msg.role == "admin":
            self.registry.admins.add(peer)
            self._admin_names[peer] = user or msg.name[:64]
        elif msg.role == "site":
            if not is_safe_name(msg.name):
                raise PeerError(user or peer.hex(), f"invalid site name {msg.name[:64]!r}")
            holds = check_holds(msg.holds, msg.name)
            _, arrival = self.registry.hello(peer, msg.name, msg.session, msg.caps, now)
            log.info("site registered", site=msg.name, arrival=arrival, holds=len(holds))
        else:
            raise PeerError(user or msg.name[:64], f"unknown role {msg.role[:32]!r}")
        await self._send(peer, Welcome(self.session, self.config.heartbeat_s, self.config.liveness))
        if msg.role == "site":
            assert self.hub is not None
            its_jobs = [c for c in self.controllers.values() if msg.name in c.sites] if arrival != "same" else []
            again: dict[str, list[InFlight]] = {}
            if arrival == "restarted":
                # The old process's downloads died with it. Their tasks get new downloads first, with no await in
                # between, so that the aborted ones' failures are ignored; they go out after the deploy.
                again = {c.job_id: c.site_restarted(msg.name, holds) for c in its_jobs}
                self.hub.abort_peer(peer, "the site restarted", incoming=False)
            else:  # a model whose offer found the site reconnecting is offered again
                await self.hub.reoffer_all(peer)
            for c in its_jobs:
                await self._deploy(c.job_id, [msg.name])
                c.send_again(again.get(c.job_id, []))
                c.site_joined(msg.name)
            await self._start_waiting_jobs()

    async def _liveness_loop(self) -> None:
        """Declare silent sites gone; runs at the heartbeat period (the liveness clock, not a data poll).

        Silence is judged only up to the moment the receive loop last had nothing unread: after the loop was
        held up (a long fold, a checkpoint, a busy machine), heartbeats may sit in the socket, and a sweep
        that ran first expired every site at once (as when many sites import torch on a small machine)."""
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            assert self.endpoint is not None
            backlogged = self.endpoint.backlogged()  # then silence counts only up to when nothing was unread
            seen_until = self.endpoint.drained_at if backlogged else time.monotonic()
            for rec in self.registry.expire(seen_until):
                self._site_gone(rec.peer, "heartbeat timeout", rec.name)
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
        for c in list(self.controllers.values()):
            c.site_left(name, why)

    def _job_event(self, site: str, msg: JobEvent) -> None:
        """Script events are recorded for any job the site took part in (they may trail the job's end).

        ``log`` records are checked (``tracking.check_record``) and, when the job names ``[tracking] types``, go
        to its tracking stores too; ``log_text`` lines (the script's output) go to ``<job>/logs/<site>.log``
        only, never into the store."""
        job = self.store.job(msg.job_id)
        if job is None or site not in job["sites"]:
            raise PeerError(site, f"an event of job {msg.job_id[:80]!r}, which this site never ran")
        if msg.event == "log_text":
            lines, dropped = check_lines(msg.data)
            self.tracking.lines(msg.job_id, site, lines, dropped)
            return
        if msg.event == "log":
            rec = check_record(msg.data)
            if self.tracking.wants_records(job):
                self.tracking.record(msg.job_id, site, rec)
        data = {"code": msg.code, "detail": msg.detail[:2000], **msg.data}
        self.store.record_event(msg.job_id, site, msg.event, data)
        c = self.controllers.get(msg.job_id)
        if c is not None and msg.event in ("crashed", "exited") and c.state == "running":
            log.warning("script ended", job=msg.job_id, site=site, outcome=msg.event, code=msg.code)
            c.site_crashed(site, f"{msg.event} with code {msg.code}: {msg.detail[-300:]}")

    async def _on_offer(self, peer: bytes, offer: Offer) -> BufferSink | None:
        """An incoming stream, counted against the peer's streams in flight until its result is settled."""
        if not self.limits.open_stream(peer):
            cap = self.config.max_streams_per_peer
            log.warning("peer over its streams in flight: refusing", peer=peer, sid=offer.sid, limit=cap)
            await self._send_error(peer, "too_many_streams", f"more than {cap} streams in flight", offer.TYPE)
            return None
        sink = None
        try:
            sink = await self._route_offer(peer, offer)
        finally:
            if sink is None:
                self.limits.close_stream(peer)
            else:
                sink.result.add_done_callback(lambda _: self.limits.close_stream(peer))
        return sink

    async def _route_offer(self, peer: bytes, offer: Offer) -> BufferSink | None:
        job_id = offer.route.get("job_id")
        if not isinstance(job_id, str):
            return None
        if offer.route.get("kind") == "model":
            return self._accept_model(peer, job_id, offer)
        c = self.controllers.get(job_id)
        pending = None if c is None else c.pending.get((peer, offer.sid))
        sink = None if c is None else await c.accept_offer(peer, offer)
        if sink is not None:
            self.metrics.track_incoming(offer.total, sink.result)
            if pending is not None:
                sink.result.add_done_callback(lambda f: self._audit_update(f, peer, offer, pending))
        return sink

    def _audit_update(self, result: asyncio.Future, peer: bytes, offer: Offer, pending: Any) -> None:
        """Every update that arrived (or failed to), with the digest its stream was verified against."""
        # the digest the stream was verified against: in its END, or in its offer (a small model sent inline)
        digest = self._end_digests.pop((peer, offer.sid), None) or offer.digest or None
        r = pending.result
        fields = {"job": r.job_id, "task": r.task_id, "site": pending.site, "version": r.version, "size": offer.total}
        if result.cancelled() or result.exception() is not None:
            reason = "cancelled" if result.cancelled() else str(result.exception())
            self.guard.audit.record("update_failed", **fields, reason=reason)
        else:
            self.guard.audit.record("update_received", **fields, digest=digest)

    def _accept_model(self, peer: bytes, job_id: str, offer: Offer) -> BufferSink | None:
        """A submitted job's initial model, streamed by its submitter into the job's folder."""
        upload = self._uploads.pop(job_id, None)
        if upload is None or upload[0] != peer:
            return None
        job = self.store.job(job_id)
        assert job is not None
        path = self.store.job_dir(job_id) / "files" / job["spec"]["model"]
        sink = SpoolSink(path=str(path), max_total=upload[1], keep=True)
        self.metrics.track_incoming(offer.total, sink.result)
        self._spawn(self._model_uploaded(job_id, sink))
        return sink

    async def _model_uploaded(self, job_id: str, sink: SpoolSink) -> None:
        try:
            params = await sink.result
        except FedbusError as exc:
            log.warning("model upload failed", job=job_id, reason=str(exc))
            self.store.set_state(job_id, "failed", f"the initial model upload failed: {exc}")
            return
        params.release()
        self.store.set_state(job_id, "waiting")
        log.info("job ready", job=job_id)
        await self._start_waiting_jobs()

    async def _stream(self, peer: bytes, source: ModelSource, route: dict, sid: int) -> None:
        assert self.hub is not None
        start, ok = time.monotonic(), False
        try:
            await self.hub.send(peer, source, route, sid)
            ok = True
        finally:
            self.metrics.stream_done("out", source.total, time.monotonic() - start, ok)
        if "task_id" in route:
            rec = self.registry.by_peer(peer)
            self.guard.audit.record(
                "task_sent",
                job=route.get("job_id"),
                task=route["task_id"],
                site=rec.name if rec is not None else None,
                size=source.total,
                digest=source.sums(self.hub.chunk_size, self.hub.alg).digest(),
            )

    def peer_of(self, site: str) -> bytes | None:
        return self.registry.peer_of(site)

    async def send(self, peer: bytes, msg: Message, payload: Any = ()) -> None:
        await self._send(peer, msg, payload)

    async def stream(self, peer: bytes, source: ModelSource, route: dict, sid: int) -> None:
        await self._stream(peer, source, route, sid)

    # --- jobs ------------------------------------------------------------------------------------------------------

    async def _start_waiting_jobs(self) -> None:
        for job in self.store.jobs(("waiting",)):
            if job["id"] in self.controllers:
                continue
            spec = job["spec"]
            online = [s for s in self.registry.online() if not spec["include"] or s in spec["include"]]
            if len(online) < spec["min_sites"]:
                continue
            sites = job["sites"] or online[: spec["max_sites"] or None]
            if any(s not in online for s in sites):
                continue  # a resumed job waits for its own sites
            await self._launch(job["id"], spec, sites)

    async def _launch(self, job_id: str, spec: dict, sites: list[str]) -> None:
        try:
            strategy = self._with_cross_site(job_id, spec, make_strategy(spec["strategy"], **spec["strategy_args"]))
            latest = self.store.latest_version(job_id)
            if latest is None:
                version, path = 0, self.store.job_dir(job_id) / "files" / spec["model"]
            else:
                version, path = latest
            model = open_params(path, max_total=int(self.config.max_model_mb * MiB))
        except (FedbusError, OSError) as exc:
            log.error("job cannot start", job=job_id, reason=str(exc))
            self.store.set_state(job_id, "failed", f"cannot start: {exc}")
            return
        c = JobController(
            job_id,
            spec,
            strategy,
            self.store,
            self,
            max_model_bytes=int(self.config.max_model_mb * MiB),
            upload_slots=self.upload_slots,
            on_end=self._job_ended,
            keep_versions=self.config.keep_versions,
            metrics=self.metrics,
        )
        self.controllers[job_id] = c
        self.store.set_sites(job_id, sites)
        self.store.set_state(job_id, "running")
        for name in sites:
            self.registry.sites[name].jobs.add(job_id)
        await self._deploy(job_id, sites)
        try:
            c.start(model, sites, version)
        finally:
            model.release()
        if latest is None:
            path = await asyncio.to_thread(self.store.write_checkpoint, job_id, 0, c.strategy.model)
            self.store.add_version(job_id, 0, path, {})

    def _with_cross_site(self, job_id: str, spec: dict, strategy: Strategy) -> Strategy:
        """The job's strategy, wrapped in cross-site evaluation when its spec asks (``[cross_site_eval]``), with
        the job folder's server models (``SERVER_MODELS``) given to it; a standalone ``cross_site_eval``
        strategy gets them too. Read on the loop, as ``_launch`` must not await before the job's controller is
        registered (a second launch of the same job could start meanwhile): these are small evaluation models."""
        if not spec.get("cross_site_eval") and not isinstance(strategy, CrossSiteEval):
            return strategy
        folder = self.store.job_dir(job_id) / "files" / SERVER_MODELS
        models = {}
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
            if not is_safe_name(path.stem):
                raise ConfigError(f"{SERVER_MODELS}/{path.name}: a server model's name must be a safe name")
            models[path.stem] = serde.read_file(path, max_total=int(self.config.max_model_mb * MiB))
        if not isinstance(strategy, CrossSiteEval):
            strategy = CrossSiteEval(strategy, timeout=getattr(strategy, "round_timeout", None))
        strategy.add_server_models(models)
        return strategy

    async def _deploy(self, job_id: str, sites: list[str]) -> None:
        spec = self.store.job(job_id)["spec"]  # type: ignore[index]
        archive = (self.store.job_dir(job_id) / "job.zip").read_bytes()
        all_sites = self.store.job(job_id)["sites"]  # type: ignore[index]
        c = self.controllers.get(job_id)
        for name in sites:
            peer = self.registry.peer_of(name)
            if peer is None:
                continue
            config = {
                "name": spec["name"],
                "site_index": all_sites.index(name),
                "num_sites": len(all_sites),
                "strategy": spec["strategy"],
                "params_type": c.params_type if c else "FULL",
                "task_timeout_s": spec.get("task_timeout_s"),
            }
            msg = Deploy(job_id=job_id, script=spec["script"], args=list(spec["script_args"]), config=config)
            with contextlib.suppress(TransportError):
                await self._send(peer, msg, [archive])
                self.guard.audit.record("job_deployed", job=job_id, site=name, size=len(archive))

    def _job_ended(self, job_id: str) -> None:
        c = self.controllers.pop(job_id, None)
        if c is not None:
            for name in c.sites:
                rec = self.registry.sites.get(name)
                if rec is not None:
                    rec.jobs.discard(job_id)
            self._spawn(c.close())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- admin requests --------------------------------------------------------------------------------------------

    async def _request(self, peer: bytes, req: Request, payload: list[memoryview], user: str = "") -> None:
        by = self._admin_names.get(peer, user)
        try:
            data = await self._admin_op(peer, req, payload)
        except (FedbusError, OSError) as exc:
            log.warning("request refused", op=req.op, reason=str(exc))
            self.guard.refused(str(exc), peer=peer, user=by, type=f"request:{req.op[:32]}")
            self.guard.audit.flush()
            await self._send(peer, Reply(rid=req.rid, ok=False, error=str(exc)[:2000]))
            return
        kind = {"submit": "job_submitted", "abort": "job_aborted", "download": "job_downloaded"}.get(req.op)
        if kind is not None:
            self.guard.audit.record(kind, job=data.get("job_id"), by=by, key=self.guard.key_of(user))
        self.guard.audit.flush()  # what the admin is told about (a revocation, a job) is in the trail first
        await self._send(peer, *_reply(req.rid, data))
        if req.op == "download":
            self._spawn(self._send_download(peer, data))
        elif req.op == "submit":
            await self._start_waiting_jobs()

    async def _admin_op(self, peer: bytes, req: Request, payload: list[memoryview]) -> dict[str, Any]:
        who = self._admin_names.get(peer, peer.hex())
        if req.op == "submit":
            if len(payload) != 1:
                raise PeerError(who, "submit needs exactly one payload frame: the job folder as a zip")
            return self._submit(peer, bytes(payload[0]), req.args.get("model_bytes"))
        if req.op == "status":
            return self._status(req.args.get("job_id"))
        if req.op == "sites":
            return {"sites": [r.summary() for r in self.registry.sites.values()]}
        job_id = req.args.get("job_id")
        job = self.store.job(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise ConfigError(f"no such job: {job_id!r}")
        if req.op == "abort":
            c = self.controllers.get(job["id"])
            if c is not None:
                c.abort("aborted by an admin")
            elif job["state"] in ACTIVE_STATES:
                self.store.set_state(job["id"], "aborted", "aborted by an admin")
            return {"job_id": job["id"]}
        if req.op == "download":
            latest = self.store.latest_version(job["id"])
            return {
                "job_id": job["id"],
                "state": job["state"],
                "version": latest[0] if latest else None,
                "history": self.store.history(job["id"]),
                "evaluations": self.store.events(job["id"], "evaluation"),
                "cross_site": self.store.cross_site(job["id"]),
                "updates": self.store.updates(job["id"]),
                **self._best_model(job),
            }
        raise PeerError(who, f"unknown request op {req.op[:32]!r}")

    def _best_model(self, job: dict[str, Any]) -> dict[str, Any]:
        """The download's ``best_*`` fields, with ``[tracking] key_metric``: the best version and its file."""
        key = key_metric_of(job["spec"])
        best = best_version(self.store.history(job["id"]), key) if key else None
        if best is None:
            return {}
        # best_model.safetensors is written by the job's tracking thread just after the version is published; until
        # then (or if it failed), the version's own checkpoint is the same model.
        candidates = (self.store.job_dir(job["id"]) / BEST_MODEL, self.store.checkpoint_path(job["id"], best[0]))
        where = next((str(p) for p in candidates if p.exists()), None)
        return {"best_version": best[0], "best_metric": best[1], "best_model_path": where}

    def _submit(self, peer: bytes, archive: bytes, model_bytes: Any) -> dict[str, Any]:
        """Accept a job folder (without its model); the submitter streams the model next."""
        max_model = int(self.config.max_model_mb * MiB)
        if type(model_bytes) is not int or not 0 < model_bytes <= max_model:
            who = self._admin_names.get(peer, peer.hex())
            raise PeerError(who, f"submit: model_bytes must be an int in (0, {max_model}], got {model_bytes!r}")
        job_id = self.store.new_job_id("job")
        folder = self.store.job_dir(job_id)
        spec = jobs.unpack_job(archive, folder / "files", require_model=False)
        job_id_final = f"{spec.name}-{job_id.removeprefix('job-')}"
        folder.rename(self.store.job_dir(job_id_final))
        job_id = job_id_final
        (self.store.job_dir(job_id) / "job.zip").write_bytes(archive)
        self.store.create_job(job_id, spec.name, dataclasses.asdict(spec), state="uploading")
        self._uploads[job_id] = (peer, model_bytes)
        log.info("job submitted", job=job_id, name=spec.name, strategy=spec.strategy)
        return {"job_id": job_id}

    def _status(self, job_id: Any) -> dict[str, Any]:
        out = []
        for job in self.store.jobs():
            if job_id is not None and job["id"] != job_id:
                continue
            entry = {k: job[k] for k in ("id", "name", "state", "version", "reason", "sites", "created")}
            c = self.controllers.get(job["id"])
            if c is not None:
                entry["live"] = c.status()
            history = self.store.history(job["id"])
            entry["last_metrics"] = history[-1]["metrics"] if history else {}
            times = [h["time"] for h in history[-6:]]
            entry["seconds_per_version"] = [round(b - a, 3) for a, b in itertools.pairwise(times)]
            out.append(entry)
        if job_id is not None and not out:
            raise ConfigError(f"no such job: {job_id!r}")
        return {"jobs": out, "sites": [r.summary() for r in self.registry.sites.values()]}

    async def _send_download(self, peer: bytes, data: dict[str, Any]) -> None:
        if data["version"] is None:
            return
        path = self.store.checkpoint_path(data["job_id"], data["version"])
        try:
            model = await asyncio.to_thread(serde.read_file, path)
            route = {"job_id": data["job_id"], "kind": "download", "version": data["version"]}
            await self._stream(peer, ModelSource.from_state_dict(model), route, int.from_bytes(os.urandom(7), "big"))
        except (FedbusError, OSError) as exc:
            log.warning("download failed", job=data["job_id"], reason=str(exc))


def check_holds(holds: list, site: str) -> frozenset[str]:
    """A site's ``hello.holds``, checked: at most ``MAX_HELD`` task ids, each a safe name (else PeerError)."""
    if len(holds) > MAX_HELD:
        raise PeerError(site, f"hello names {len(holds)} held tasks, more than {MAX_HELD}")
    for task_id in holds:
        if not is_safe_name(task_id):
            raise PeerError(site, f"hello names a held task that is not a task id: {str(task_id)[:80]!r}")
    return frozenset(holds)


def _reply(rid: int, data: dict[str, Any]) -> tuple[Reply, list[bytes]]:
    """A reply whose data may outgrow an envelope (a long job's history, every update record): big data
    travels as one msgpack payload frame instead, flagged by ``data == {"payload": "msgpack"}``."""
    packed = msgpack.packb(data, use_bin_type=True)
    if len(packed) <= REPLY_INLINE_MAX:
        return Reply(rid=rid, ok=True, data=data), []
    return Reply(rid=rid, ok=True, data={"payload": "msgpack"}), [packed]
