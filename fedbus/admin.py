"""The admin side of the bus: submit, status, abort and download, for the CLI and the recipes' environments.

An ``Admin`` is a DEALER that says hello as ``admin`` and then sends requests; each request waits for
the reply with the same ``rid``. ``download`` also receives the final model as a stream into a
``.safetensors`` file (written in place as chunks arrive).

The streaming layer (and torch, 2 s of imports on a small machine) is loaded by the commands that move a model
(``submit``, ``download``) only: ``fedbus status`` and ``abort`` answer in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
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
        await self.endpoint.send(b"", Hello(role="admin", name=self.name, session=os.urandom(8).hex()))
        try:
            await self._await_welcome()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _await_welcome(self) -> None:
        assert self._welcome is not None
        waits: set[asyncio.Future[Any]] = {self._welcome} | ({self._refused} if self._refused else set())
        done, _ = await asyncio.wait(waits, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
        if self._welcome in done:
            self._welcome.result()  # raises the broker's refusal of our hello
        elif self._refused is not None and self._refused in done:
            raise TransportError(f"the broker at {self.address} refused this key: {self._refused.result()}")
        else:
            raise TransportError(f"no answer from a broker at {self.address} within {self.timeout:.0f} s")

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
            if isinstance(msg, Welcome) and self._welcome is not None and not self._welcome.done():
                self._welcome.set_result(msg)
            elif isinstance(msg, Reply) and msg.rid in self._replies:
                fut = self._replies.pop(msg.rid)
                if not fut.done():
                    fut.set_result(_unpack_reply(msg, inc.payload))
            elif isinstance(msg, Error) and self._welcome is not None and not self._welcome.done():
                self._welcome.set_exception(TransportError(f"broker refused: {msg.reason}"))
            elif msg.TYPE in STREAM_TYPES and self.hub is not None:  # none before we asked for a stream
                await self.hub.dispatch(inc.peer, msg, inc.payload)

    async def request(self, op: str, args: dict[str, Any] | None = None, payload: list[bytes] | None = None) -> dict:
        """Send one request and return the reply's data; a refusal raises JobError with the broker's reason."""
        assert self.endpoint is not None
        self._rid += 1
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._replies[self._rid] = fut
        await self.endpoint.send(b"", Request(rid=self._rid, op=op, args=args or {}), payload or [])
        try:
            reply = await asyncio.wait_for(fut, self.timeout)
        except TimeoutError:
            self._replies.pop(self._rid, None)
            raise TransportError(f"no reply to {op!r} within {self.timeout:.0f} s") from None
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
        data = await self.request("submit", {"model_bytes": source.total}, payload=[archive])
        job_id = str(data["job_id"])
        await hub.send(b"", source, {"job_id": job_id, "kind": "model"})
        return job_id

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
        data = await self.request("download", {"job_id": job_id})
        data["model_path"] = None
        if data.get("version") is not None:
            sink = await asyncio.wait_for(done, self.timeout)
            await asyncio.wait_for(sink.result, self.timeout)
            final = dest / "model.safetensors"
            assert sink.path is not None
            os.replace(sink.path, final)
            data["model_path"] = str(final)
        self._download = None
        return data

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
