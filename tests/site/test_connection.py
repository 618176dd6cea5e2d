"""The site's connection to the broker: reconnects, refuses garbage and keeps serving, leaves cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest
import zmq.asyncio

from fedbus.errors import TransportError
from fedbus.protocol.messages import PROTOCOL_VERSION, Bye, Error, Heartbeat, Request, Task
from tests.site.helpers import HEARTBEAT_S, FakeBroker, running_site

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


async def rebind(ctx: zmq.asyncio.Context, address: str) -> FakeBroker:
    """A new broker on ``address``; zmq closes the old listener in its I/O thread, so the port may lag."""
    async with asyncio.timeout(5):
        while True:
            try:
                return FakeBroker(ctx, address)
            except TransportError:
                await asyncio.sleep(0.05)


async def test_a_restarted_broker_gets_a_new_hello(tmp_path: Path, ctx: zmq.asyncio.Context) -> None:
    broker = FakeBroker(ctx, "tcp://127.0.0.1:0")
    address = broker.address
    try:
        async with running_site(tmp_path / "ws", address) as site:
            await broker.wait_hellos(1)
            await asyncio.wait_for(site.welcomed.wait(), 5)
            await broker.close()
            broker = await rebind(ctx, address)  # same port, a broker that knows nobody
            await broker.wait_hellos(1, timeout=5)
            await asyncio.wait_for(site.welcomed.wait(), 5)
    finally:
        await broker.close()


async def test_a_silent_broker_is_redialled(tmp_path: Path, ctx: zmq.asyncio.Context) -> None:
    broker = FakeBroker(ctx, f"ipc://{tmp_path}/broker.sock", answer_heartbeats=False)
    try:
        async with running_site(tmp_path / "ws", broker.address) as site:
            await broker.wait_hellos(1)
            # heartbeat 0.2 s x liveness 5: silence is noticed after 1 s, the next hello comes 0.1 s later
            await broker.wait_hellos(2, timeout=5)
            assert site.hellos >= 2
    finally:
        await broker.close()


async def test_a_site_sends_heartbeats_only_when_neither_side_said_anything(
    tmp_path: Path, ctx: zmq.asyncio.Context
) -> None:
    broker = FakeBroker(ctx, f"ipc://{tmp_path}/broker.sock")
    loop = asyncio.get_running_loop()

    async def traffic(*, answered: bool) -> tuple[float, float]:
        start = loop.time()
        while loop.time() < start + 5 * HEARTBEAT_S:  # 4 messages per heartbeat period
            await site.uplink.send(Error("chatter", "traffic counts as a heartbeat"))
            if answered:
                await broker.send(Heartbeat())  # the site ignores it, but it is news from the broker
            await asyncio.sleep(HEARTBEAT_S / 4)
        return start + HEARTBEAT_S / 2, loop.time()  # from when the last scheduled heartbeat has passed

    def beats(start: float, end: float) -> int:
        return len([t for t in broker.heartbeats if start < t <= end])

    try:
        async with running_site(tmp_path / "ws", broker.address) as site:
            await asyncio.wait_for(site.welcomed.wait(), 5)
            both = await traffic(answered=True)
            one_way = await traffic(answered=False)  # the site talks, the broker only answers heartbeats
            quiet = loop.time()
            await asyncio.sleep(5 * HEARTBEAT_S)
            # Heartbeats every period would put 4-5 here; one is allowed for a loop held up on a loaded machine
            # (a stall of a period between a message and its answer makes one due, rightly).
            assert beats(*both) <= 1
            assert beats(*one_way) >= 3  # about one per period: a pong is the only news from the broker
            assert beats(quiet, loop.time()) >= 3
            assert site.hellos == 1  # the broker never seemed silent
    finally:
        await broker.close()


async def test_garbage_and_unexpected_messages_are_refused_and_serving_goes_on(
    tmp_path: Path, ctx: zmq.asyncio.Context
) -> None:
    broker = FakeBroker(ctx, f"ipc://{tmp_path}/broker.sock")
    try:
        async with running_site(tmp_path / "ws", broker.address) as site:
            await broker.wait_hellos(1)
            bogus = msgpack.packb({"v": PROTOCOL_VERSION, "t": "bogus", "id": 1})
            await broker.ep.send_raw([broker.peer, bogus])
            error = await broker.expect("error")
            assert isinstance(error, Error) and error.code == "bad_message" and "bogus" in error.reason
            await broker.send(Request(rid=1, op="status"))
            error = await broker.expect("error")
            assert isinstance(error, Error) and error.code == "refused" and error.ref == "request"
            await broker.send(Task("nope", "t-1", "train", 0, 0, 1))
            error = await broker.expect("error")
            assert isinstance(error, Error) and error.ref == "task"
            assert site.hellos == 1 and site.welcomed.is_set()
        bye = await broker.expect("bye")
        assert isinstance(bye, Bye)
    finally:
        await broker.close()


SERVE = """
import sys
from fedbus.config import SiteConfig
from fedbus.site import Site
Site(SiteConfig(name="site-s", broker=sys.argv[1], workspace=sys.argv[2], heartbeat_s=0.2)).run()
print("site exited cleanly", flush=True)
"""


async def test_sigterm_shuts_the_daemon_down_gracefully(tmp_path: Path, ctx: zmq.asyncio.Context) -> None:
    broker = FakeBroker(ctx, f"ipc://{tmp_path}/broker.sock")
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SERVE), broker.address, str(tmp_path / "ws")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        await broker.wait_hellos(1, timeout=30)
        os.kill(proc.pid, signal.SIGTERM)
        assert isinstance(await broker.expect("bye", timeout=10), Bye)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=10)
        assert proc.returncode == 0, out
        assert b"site exited cleanly" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await broker.close()


@pytest.mark.parametrize("transport", ["tcp", "inproc"])
async def test_a_site_in_process_uses_no_lanes(
    tmp_path: Path, ctx: zmq.asyncio.Context, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over inproc:// (SimEnv) messages are handed over, not copied by I/O threads: a lane would only make the
    broker put chunks back in order."""
    monkeypatch.setenv("FEDBUS_LANES", "2")
    broker = FakeBroker(ctx, "tcp://127.0.0.1:0" if transport == "tcp" else f"inproc://lanes-{os.getpid()}")
    try:
        async with running_site(tmp_path / "ws", broker.address, ctx=ctx) as site:
            await broker.wait_hellos(1)
            assert site.uplink.ep is not None
            assert len(site.uplink.ep._lanes) == (1 if transport == "tcp" else 0)
    finally:
        await broker.close()
