"""A fake broker for site tests (a ROUTER + StreamHub driven by the test) and tiny job folders.

The fake broker behaves like the real one where the site depends on it: it welcomes a hello, answers
heartbeats, and accepts an upload stream only after the ``result`` that announced its sid (so a site that
streamed first would fail these tests). Everything else the site sends lands in ``inbox`` for the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import textwrap
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
import zmq.asyncio

from fedbus.config import SiteConfig
from fedbus.errors import PeerUnreachable
from fedbus.jobs import pack_job
from fedbus.modelio import serde
from fedbus.modelio.sinks import BufferSink
from fedbus.protocol.messages import STREAM_TYPES, Error, Heartbeat, Hello, Message, Offer, Result, Welcome
from fedbus.site import Site
from fedbus.transport.endpoint import BadMessage, Incoming, RouterEndpoint
from fedbus.transport.streams import StreamHub

WAIT = 20.0
HEARTBEAT_S = 0.2

PLUS_ONE = """
import sys

import fedbus.client as flare

delta = float(sys.argv[sys.argv.index("--delta") + 1])
flare.init()
while flare.is_running():
    model = flare.receive()
    flare.log("version", model.meta["version"], model.current_round)
    params = {k: v + delta for k, v in model.params.items()}
    flare.send(flare.FLModel(params=params, meta={flare.NUM_STEPS_CURRENT_ROUND: 5}))
print("script done", flush=True)
"""


class FakeBroker:
    """The broker's side of the site connection, with a queue of what the site said."""

    def __init__(
        self, ctx: zmq.asyncio.Context, address: str, *, welcome: bool = True, answer_heartbeats: bool = True
    ) -> None:
        self.ep = RouterEndpoint.bind(ctx, address)
        self.address = self.ep.address
        self.hub = StreamHub(self.ep, on_offer=self._on_offer, chunk_size=64 << 10, window=256 << 10, stall_timeout=5)
        self.welcome = welcome
        self.answer_heartbeats = answer_heartbeats
        self.known: set[bytes] = set()
        self.refuse_uploads = False  # what a broker does with an update for a task it closed already
        self.refused: list[Offer] = []
        self.inbox: asyncio.Queue[Incoming] = asyncio.Queue()
        self.uploads: asyncio.Queue[tuple[Result, BufferSink]] = asyncio.Queue()
        self.results: dict[tuple[bytes, int], Result] = {}
        self.hellos = 0
        self.last_hello: Hello | None = None
        self.heartbeats: list[float] = []  # the loop's clock at each heartbeat received
        self.peer = b""
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            try:
                inc = await self.ep.recv()
            except BadMessage:
                continue
            try:
                await self._answer(inc)
            except PeerUnreachable:
                continue  # the site left (or reconnects) before the answer: lost, as at a real broker

    async def _answer(self, inc: Incoming) -> None:
        if inc.msg.TYPE in STREAM_TYPES:
            await self.hub.dispatch(inc.peer, inc.msg, inc.payload)
        elif isinstance(inc.msg, Hello):
            self.hellos += 1
            self.last_hello = inc.msg
            self.peer = inc.peer
            if self.welcome:
                self.known.add(inc.peer)
                await self.ep.send(inc.peer, Welcome("broker-1", HEARTBEAT_S, 5))
        elif isinstance(inc.msg, Heartbeat):
            self.heartbeats.append(asyncio.get_running_loop().time())
            if inc.peer not in self.known:  # what a restarted broker says to a peer it forgot
                await self.ep.send(inc.peer, Error("hello_required", "say hello first", "heartbeat"))
            elif self.answer_heartbeats:
                await self.ep.send(inc.peer, Heartbeat())
        else:
            if isinstance(inc.msg, Result) and inc.msg.sid is not None:
                self.results[(inc.peer, inc.msg.sid)] = inc.msg
            await self.inbox.put(inc)

    async def _on_offer(self, peer: bytes, offer: Offer) -> BufferSink | None:
        result = self.results.pop((peer, offer.sid), None)
        if result is None or self.refuse_uploads:
            self.refused.append(offer)
            return None
        sink = BufferSink(max_total=1 << 30)
        await self.uploads.put((result, sink))
        return sink

    async def send(self, msg: Message, payload: list[bytes] | None = None) -> None:
        await self.ep.send(self.peer, msg, payload or [])

    async def expect(self, mtype: str, timeout: float = WAIT, **fields: object) -> Any:
        """The next message of ``mtype`` (others of that type with other field values are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                msg = (await self.inbox.get()).msg
                if mtype == msg.TYPE and all(getattr(msg, k) == v for k, v in fields.items()):
                    return msg

    async def wait_hellos(self, n: int, timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while self.hellos < n:
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.hub.close()
        self.ep.close()


@contextlib.asynccontextmanager
async def running_site(workspace: Path, broker: str, **opts: object) -> AsyncIterator[Site]:
    """A real site daemon in this event loop; shut down (bounded) on exit."""
    cfg = {"name": "site-a", "broker": broker, "workspace": str(workspace), "heartbeat_s": HEARTBEAT_S, "liveness": 5}
    for key in ("task_timeout_s", "python"):
        if key in opts:
            cfg[key] = opts.pop(key)
    opts.setdefault("end_grace_s", 5.0)
    opts.setdefault("kill_after_s", 1.0)
    site = Site(SiteConfig(**cfg), shutdown_timeout_s=10.0, **opts)  # type: ignore[arg-type]
    await asyncio.wait_for(site.__aenter__(), WAIT)
    try:
        yield site
    finally:
        await asyncio.wait_for(site.__aexit__(None, None, None), WAIT)


def sample_model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "layer.weight": torch.randn(16, 8, generator=g),
        "layer.bias": torch.randn(16, generator=g),
        "head.weight": torch.randn(3, 16, generator=g, dtype=torch.float64),
    }


def job_archive(folder: Path, script: str, *, args: tuple[str, ...] = ()) -> bytes:
    """A valid job folder (job.toml, model, client.py) packed as the broker would send it."""
    folder.mkdir(parents=True, exist_ok=True)
    quoted = ", ".join(f'"{a}"' for a in args)
    (folder / "job.toml").write_text(
        textwrap.dedent(
            f"""\
            name = "test-job"
            model = "model.safetensors"
            [strategy]
            name = "fedavg"
            min_clients = 1
            num_rounds = 1
            [script]
            path = "client.py"
            args = [{quoted}]
            """
        )
    )
    serde.write_file(folder / "model.safetensors", sample_model())
    (folder / "client.py").write_text(textwrap.dedent(script))
    return pack_job(folder)


def evil_archive(valid: bytes, name: str = "../evil.py") -> bytes:
    """``valid`` plus one entry whose name escapes the job folder."""
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(valid)) as src, zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr(name, "print('escaped')\n")
    return buf.getvalue()


@contextlib.asynccontextmanager
async def fake_broker(folder: Path) -> AsyncIterator[FakeBroker]:
    """A FakeBroker on an ipc socket in ``folder``, with a zmq context of its own, closed on the way out."""
    ctx = zmq.asyncio.Context()
    fake = FakeBroker(ctx, f"ipc://{folder}/broker.sock")
    try:
        yield fake
    finally:
        await fake.close()
        ctx.destroy(linger=0)
