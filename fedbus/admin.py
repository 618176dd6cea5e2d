"""The admin side of the bus: submit, status, abort and download, for the CLI and the recipes' environments.

An ``Admin`` is a DEALER that says hello as ``admin`` and then sends requests; each request waits for
the reply with the same ``rid``. ``download`` also receives the final model as a stream into a
``.safetensors`` file (written in place as chunks arrive).

Riding over a broker restart. Each request waits up to ``timeout`` for its reply; meanwhile the admin finds out
whether the broker it asked is still there: a broker that does not know us (a new process) refuses our request
as from a peer that never said hello, and a reply slow to come is followed by a ``hello`` every few seconds, whose
``welcome`` names the broker's session. When that session changed, or the broker forgot us, the admin says hello
again and sends the request again, under the same rid (a late reply of the first send is ignored). ``status``,
``sites`` and ``download`` are harmless to repeat; ``submit`` carries a ``submit_key`` of the admin's making, and
a broker that already has the job of that key answers with it instead of making another (``resubmit``).

The streaming layer (and torch, 2 s of imports on a small machine) is loaded by the commands that move a model
(``submit``, ``download``) only: ``fedbus status`` and ``abort`` answer in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from fedbus import jobs
from fedbus.config import AdminConfig, load_config
from fedbus.errors import JobError, TransportError
from fedbus.protocol.messages import STREAM_TYPES, Error, Hello, Offer, Reply, Request, Welcome
from fedbus.security import ClientKeys, client_keys
from fedbus.transport.context import Context, shared_context
from fedbus.transport.curve import handshake_refused
from fedbus.transport.endpoint import BadMessage, DealerEndpoint

if TYPE_CHECKING:
    from fedbus.modelio.sinks import BufferSink
    from fedbus.transport.streams import StreamHub

PROBE_S, PROBE_MAX_S = 2.0, 8.0
"""A reply not there after ``PROBE_S`` sends a hello to see whether the broker restarted; then every twice as long
(up to ``PROBE_MAX_S``) until the reply comes or the request's timeout passes."""


class Admin:
    """An async admin connection to one broker; use as ``async with Admin(address) as admin``."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 30.0,
        ctx: Context | None = None,
        keys: ClientKeys | None = None,
        name: str = "admin",
    ) -> None:
        self.address = address
        self.keys = keys
        self.name = name
        self.timeout = timeout
        self.ctx = ctx or shared_context()
        self.endpoint: DealerEndpoint | None = None
        self.hub: StreamHub | None = None
        self._rid = 0
        self._replies: dict[int, asyncio.Future[Reply]] = {}
        self._welcome: asyncio.Future[Welcome] | None = None
        self.broker_session = ""  # the session of the broker that last welcomed us
        self._generation = 0  # bumped when the broker's session changed or it forgot us: requests go again
        self._changed = asyncio.Event()  # set (and replaced) at each generation
        self._forgotten = False  # the broker refused a request as from a peer that never said hello
        self._download: tuple[str, Path, asyncio.Future[BufferSink]] | None = None
        self._reader: asyncio.Task | None = None
        self._refused: asyncio.Future[str] | None = None

    async def __aenter__(self) -> Admin:
        curve = self.keys.as_tuple() if self.keys is not None else None
        self.endpoint = DealerEndpoint.connect(self.ctx, self.address, curve=curve)
        self._welcome = asyncio.get_running_loop().create_future()
        self._reader = asyncio.ensure_future(self._read())
        if self.keys is not None:  # a refused key fails the handshake: say so now rather than time out
            self._refused = asyncio.ensure_future(handshake_refused(self.endpoint.sock))
        self._session_id = os.urandom(8).hex()
        await self.endpoint.send(b"", Hello(role="admin", name=self.name, session=self._session_id))
        try:
            await self._await_welcome(self.timeout)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _await_welcome(self, timeout: float) -> None:
        assert self._welcome is not None
        waits: set[asyncio.Future[Any]] = {self._welcome} | ({self._refused} if self._refused else set())
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self._welcome in done:
            self._welcome.result()  # raises the broker's refusal of our hello
        elif self._refused is not None and self._refused in done:
            raise TransportError(f"the broker at {self.address} refused this key: {self._refused.result()}")
        else:
            raise TransportError(f"no answer from a broker at {self.address} within {timeout:.0f} s")

    async def _hello_again(self, timeout: float) -> None:
        """Say hello again (concurrent requests share the wait) and wait up to ``timeout`` for the welcome, saying it
        again every ``PROBE_S`` (a hello the dying broker read is lost); a broker whose session is new, or that
        had forgotten us, starts a new generation (``_on_welcome``)."""
        assert self.endpoint is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._welcome is None or self._welcome.done():
            self._welcome = loop.create_future()
        welcome = self._welcome
        while True:
            await self.endpoint.send(b"", Hello(role="admin", name=self.name, session=self._session_id))
            left = deadline - loop.time()
            try:
                await self._await_welcome(min(PROBE_S, left))
                return
            except TransportError:
                if welcome.done() or (self._refused is not None and self._refused.done()):
                    raise  # refused: the broker's or the handshake's reason
                if loop.time() >= deadline:
                    raise TransportError(f"no answer from a broker at {self.address} within {timeout:.0f} s") from None

    async def _broker_changed(self) -> bool:
        """Whether the broker restarted since the last welcome (a hello again tells; waits up to ``timeout``)."""
        generation = self._generation
        await self._hello_again(self.timeout)
        return self._generation != generation

    def _new_generation(self) -> None:
        self._generation += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def _on_welcome(self, msg: Welcome) -> None:
        if self.broker_session and (msg.session != self.broker_session or self._forgotten):
            self._new_generation()
        self.broker_session, self._forgotten = msg.session, False
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_result(msg)

    async def _wait_reply(self, fut: asyncio.Future[Any], deadline: float) -> bool:
        """Wait for ``fut`` until ``deadline`` (the loop's clock), saying hello again when the broker forgot us or
        was long silent; True once ``fut`` is done, False when the broker changed (send again), TimeoutError when
        the deadline passed."""
        loop = asyncio.get_running_loop()
        generation = self._generation
        probe, probe_at = PROBE_S, loop.time() + PROBE_S
        while not fut.done():
            now = loop.time()
            if now >= deadline:
                raise TimeoutError
            if self._generation != generation:
                return False
            if self._forgotten or now >= probe_at:
                try:  # no answer to a hello within the admin's timeout: the broker is gone (TransportError)
                    await self._hello_again(min(deadline - now, self.timeout))
                except TransportError:
                    if loop.time() >= deadline:
                        raise TimeoutError from None
                    raise
                probe = min(probe * 2, PROBE_MAX_S)
                probe_at = loop.time() + probe
                continue
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait(
                    {fut, changed}, timeout=min(deadline, probe_at) - now, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                changed.cancel()
        return True

    async def __aexit__(self, *exc: object) -> None:
        for task in (self._reader, self._refused):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.hub is not None:
            await self.hub.close()
        if self.endpoint is not None:
            self.endpoint.close()

    def _streams(self) -> StreamHub:
        """The stream hub, made on first use (the commands that move a model)."""
        if self.hub is None:
            from fedbus.transport.streams import StreamHub

            assert self.endpoint is not None
            self.hub = StreamHub(self.endpoint, on_offer=self._on_offer)
        return self.hub

    async def _read(self) -> None:
        assert self.endpoint is not None
        while True:
            try:
                inc = await self.endpoint.recv()
            except BadMessage:
                continue
            msg = inc.msg
            if isinstance(msg, Welcome):
                self._on_welcome(msg)
            elif isinstance(msg, Reply) and msg.rid in self._replies:
                fut = self._replies.pop(msg.rid)
                if not fut.done():
                    fut.set_result(_unpack_reply(msg, inc.payload))
            elif isinstance(msg, Error) and _forgot_us(msg):
                if not self._forgotten:
                    self._forgotten = True
                    self._changed.set()  # wakes the requests waiting: they say hello again
            elif isinstance(msg, Error) and self._welcome is not None and not self._welcome.done():
                self._welcome.set_exception(TransportError(f"broker refused: {msg.reason}"))
            elif msg.TYPE in STREAM_TYPES and self.hub is not None:  # none before we asked for a stream
                await self.hub.dispatch(inc.peer, msg, inc.payload)

    async def request(self, op: str, args: dict[str, Any] | None = None, payload: list[bytes] | None = None) -> dict:
        """Send one request and return the reply's data; a refusal raises JobError with the broker's reason.
        Sent again to a broker that restarted meanwhile (see the module's doc), within ``timeout`` in all."""
        assert self.endpoint is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        self._rid += 1
        rid = self._rid
        fut: asyncio.Future[Reply] = loop.create_future()
        self._replies[rid] = fut
        req = Request(rid=rid, op=op, args=args or {})
        try:
            await self.endpoint.send(b"", req, payload or [])
            while not await self._wait_reply(fut, deadline):
                await self.endpoint.send(b"", req, payload or [])  # a broker that restarted: ask it again
        except TimeoutError:
            raise TransportError(f"no reply to {op!r} within {self.timeout:.0f} s") from None
        finally:
            self._replies.pop(rid, None)
        reply = fut.result()
        if not reply.ok:
            raise JobError(reply.error)
        return reply.data

    async def submit(self, folder: str | Path) -> str:
        """Validate a job folder locally (errors name the problem before anything is sent), then submit its
        files as one archive and stream its initial model; returns the job id once the model is in."""
        from fedbus.modelio.sources import ModelSource

        hub = self._streams()
        spec = jobs.load_job_folder(folder)
        source = ModelSource.from_file(Path(folder) / spec.model)
        archive = jobs.pack_job(folder, include_model=False)
        key = secrets.token_hex(SUBMIT_KEY_BYTES)  # the same job if this submit reaches a broker twice
        while True:
            data = await self.request("submit", {"model_bytes": source.total, "submit_key": key}, payload=[archive])
            job_id = str(data["job_id"])
            if data.get("model") == "received":  # a repeated submit: the broker has the job's model already
                return job_id
            sending = asyncio.ensure_future(hub.send(b"", source, {"job_id": job_id, "kind": "model"}))
            try:
                if await self._wait_reply(sending, math.inf):
                    sending.result()
                    return job_id
            except TransportError:  # the upload failed: sent again only to a broker that restarted meanwhile
                if not await self._broker_changed():
                    raise
            finally:
                sending.cancel()
            # The broker restarted before it had the model: the same submit again (the job of this key).

    async def status(self, job_id: str | None = None) -> dict:
        return await self.request("status", {"job_id": job_id} if job_id else {})

    async def abort(self, job_id: str) -> None:
        await self.request("abort", {"job_id": job_id})

    async def download(self, job_id: str, dest: str | Path) -> dict:
        """The job's history and its latest global model, written to ``dest/model.safetensors``."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        done: asyncio.Future[BufferSink] = asyncio.get_running_loop().create_future()
        self._streams()  # before the request: the broker's offer follows its reply at once
        self._download = (job_id, dest, done)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            while True:  # again from the request when the broker restarted before the model was in
                data = await self.request("download", {"job_id": job_id})
                data["model_path"] = None
                if data.get("version") is None:
                    return data
                try:
                    if await self._wait_reply(done, deadline):
                        sink = done.result()
                        result = asyncio.ensure_future(sink.result)
                        if await self._wait_reply(result, deadline):
                            result.result()
                            break
                        # the stream of a broker that went away: whatever becomes of it is of no interest now
                        result.add_done_callback(lambda f: f.cancelled() or f.exception())
                except TimeoutError:
                    raise TransportError(f"the model of {job_id} did not arrive within {self.timeout:.0f} s") from None
                done = loop.create_future()
                self._download = (job_id, dest, done)
            final = dest / "model.safetensors"
            assert sink.path is not None
            os.replace(sink.path, final)
            data["model_path"] = str(final)
            return data
        finally:
            self._download = None

    async def _on_offer(self, peer: bytes, offer: Offer) -> BufferSink | None:
        if (
            self._download is None
            or offer.route.get("job_id") != self._download[0]
            or offer.route.get("kind") != "download"
        ):
            return None
        from fedbus.modelio.sinks import BufferSink

        _, dest, done = self._download
        sink = BufferSink(max_total=offer.total, path=str(dest / "model.safetensors.part"))
        done.set_result(sink)
        return sink


def from_kit(kit: str | os.PathLike[str], *, timeout: float = 30.0, ctx: Context | None = None) -> Admin:
    """An Admin for an admin startup kit (``KIT/admin.toml``, written by ``fedbus provision``)."""
    path = Path(kit) / "admin.toml"
    cfg = load_config(AdminConfig, path)
    keys = client_keys(cfg.secret_key, cfg.broker_key, str(path))
    return Admin(cfg.broker, timeout=timeout, ctx=ctx, keys=keys, name=cfg.name)


MAX_REPLY_PAYLOAD = 64 << 20
SUBMIT_KEY_BYTES = 4
"""A submit's key (hex), chosen by the admin: the broker names the job by it and answers a repeated submit with
the job it already made."""


def _forgot_us(msg: Error) -> bool:
    """The broker refused a request as from a peer that never said hello: it is a new broker process."""
    return msg.code == "hello_required" or (msg.code == "refused" and msg.ref == "request")


def _unpack_reply(msg: Reply, payload: list[memoryview]) -> Reply:
    """A reply whose data came as a msgpack payload frame (too big for an envelope), made whole."""
    if msg.data != {"payload": "msgpack"}:
        return msg
    if len(payload) != 1 or payload[0].nbytes > MAX_REPLY_PAYLOAD:
        return Reply(rid=msg.rid, ok=False, error="malformed reply payload from the broker")
    try:
        data = msgpack.unpackb(payload[0], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for garbage
        return Reply(rid=msg.rid, ok=False, error=f"unreadable reply payload from the broker: {type(exc).__name__}")
    if not isinstance(data, dict):
        return Reply(rid=msg.rid, ok=False, error="reply payload from the broker is not a map")
    return Reply(rid=msg.rid, ok=msg.ok, data=data, error=msg.error)
