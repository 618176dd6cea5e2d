"""A receiver killed mid-stream restarts from its journal and the sender resumes, not from zero."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import zmq.asyncio

from fedbus.modelio.sources import ModelSource
from fedbus.protocol.messages import Chunk, Heartbeat
from fedbus.transport.endpoint import RouterEndpoint
from fedbus.transport.streams import StreamHub
from tests.transport.resume_peer import CHUNK, WINDOW, expected_model

PEER = [sys.executable, "-m", "tests.transport.resume_peer"]
ROOT = Path(__file__).resolve().parents[2]


async def test_receiver_killed_mid_stream_resumes_from_its_journal(tmp_path: Path) -> None:
    ctx = zmq.asyncio.Context()
    ep = RouterEndpoint.bind(ctx, f"ipc://{tmp_path}/bus.sock")
    sent: list[int] = []
    real_send = ep.send

    async def counting_send(peer, msg, payload=()):
        if isinstance(msg, Chunk):
            sent.append(sum(memoryview(p).nbytes for p in payload))
        await real_send(peer, msg, payload)

    ep.send = counting_send  # type: ignore[method-assign]

    async def refuse(peer, offer):
        return None

    hub = StreamHub(ep, on_offer=refuse, chunk_size=CHUNK, window=WINDOW, stall_timeout=30)
    hello = asyncio.Event()

    async def pump() -> None:
        while True:
            inc = await ep.recv()
            if isinstance(inc.msg, Heartbeat):
                hello.set()
            else:
                await hub.dispatch(inc.peer, inc.msg, inc.payload)

    pumping = asyncio.ensure_future(pump())
    path = str(tmp_path / "model.safetensors")
    first = subprocess.Popen([*PEER, "fresh", path, ep.address, "6"], cwd=ROOT)
    second = None
    try:
        await asyncio.wait_for(hello.wait(), 30)
        source = ModelSource.from_state_dict(expected_model())
        sending = asyncio.ensure_future(hub.send(b"rx", source))
        assert await asyncio.to_thread(first.wait, 30) == -9  # killed itself after 6 verified chunks
        before = sum(sent)
        assert CHUNK * 6 <= before <= CHUNK * 6 + WINDOW
        second = subprocess.Popen([*PEER, "resume", path, ep.address], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        await asyncio.wait_for(sending, 60)
        out, _ = await asyncio.to_thread(second.communicate, timeout=30)
        assert out.strip() == "ok"
        # resumed from the last verified chunk: at most one window of bytes was sent twice
        assert sum(sent) <= source.total + WINDOW
        assert not Path(path + ".journal").exists()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        pumping.cancel()
        await hub.close()
        ep.close()
        ctx.term()
