"""A broker held up for longer than the liveness window does not expire sites whose heartbeats wait unread,
and still expires a site that went silent.

The race itself (a sweep scheduled between reading a backlog and handling it) needs a loaded machine to show
(it did in ``fedbus bench round`` with 8 sites on 2 cores); this test holds the loop up and checks both
outcomes, so a sweep that judged silence by the wrong clock, either way, fails it."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import structlog
import zmq
import zmq.asyncio

from fedbus.broker.server import Broker
from fedbus.config import BrokerConfig
from fedbus.errors import PeerUnreachable
from fedbus.protocol.envelope import encode
from fedbus.protocol.messages import Credit, Heartbeat, Hello, Message

pytestmark = pytest.mark.timeout(60)


def _heartbeating_site(address: str, name: str, stop: threading.Event, beat: Message | None = None) -> None:
    """A site in its own thread (plain zmq): it keeps sending ``beat`` while the broker's event loop is blocked."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    try:
        sock.send(encode(Hello("site", name, "s1")))
        while not stop.wait(0.05):
            sock.send(encode(beat or Heartbeat()))
            while sock.poll(0):
                sock.recv_multipart()
    finally:
        sock.close(linger=0)
        ctx.term()


async def test_sites_are_not_expired_for_heartbeats_the_broker_has_not_read_yet(tmp_path: Path) -> None:
    cfg = BrokerConfig(bind="tcp://127.0.0.1:0", workspace=str(tmp_path / "b"), heartbeat_s=0.1, liveness=3)
    stop = threading.Event()
    with structlog.testing.capture_logs() as logs:
        async with Broker(cfg) as broker:
            beater = threading.Thread(target=_heartbeating_site, args=(broker.address, "s1", stop))
            beater.start()
            try:
                async with asyncio.timeout(10):
                    while broker.registry.online() != ["s1"]:
                        await asyncio.sleep(0.02)
                time.sleep(1.0)  # the broker's loop is held up for 3x the liveness window; heartbeats queue up
                await asyncio.sleep(0.5)  # the loop runs again: the sweep comes before the queued heartbeats
                assert not [e for e in logs if e["event"] == "site gone"]
            finally:
                stop.set()
                beater.join(5)
            async with asyncio.timeout(10):  # a site that really went silent is still declared gone
                while broker.registry.online():
                    await asyncio.sleep(0.05)
    assert [e["reason"] for e in logs if e["event"] == "site gone"] == ["heartbeat timeout"]


async def test_stream_traffic_keeps_a_site_alive_without_heartbeats(tmp_path: Path) -> None:
    # A site skips heartbeats while it sends anything else (a long upload sends only chunks): the broker must
    # count those messages as signs of life. A credit for a stream nobody knows is harmless and dropped.
    cfg = BrokerConfig(bind="tcp://127.0.0.1:0", workspace=str(tmp_path / "b"), heartbeat_s=0.1, liveness=3)
    stop = threading.Event()
    with structlog.testing.capture_logs() as logs:
        async with Broker(cfg) as broker:
            chatter = threading.Thread(
                target=_heartbeating_site, args=(broker.address, "s1", stop, Credit(sid=1, until=0))
            )
            chatter.start()
            try:
                async with asyncio.timeout(10):
                    while broker.registry.online() != ["s1"]:
                        await asyncio.sleep(0.02)
                await asyncio.sleep(1.0)  # over 3x the liveness window, no heartbeat sent
                assert broker.registry.online() == ["s1"]
            finally:
                stop.set()
                chatter.join(5)
            async with asyncio.timeout(10):  # silence still expires it
                while broker.registry.online():
                    await asyncio.sleep(0.05)
    assert [e["reason"] for e in logs if e["event"] == "site gone"] == ["heartbeat timeout"]


async def test_the_endpoint_says_when_messages_wait_unread_and_since_when_none_did() -> None:
    # What the liveness sweep relies on: the broker's endpoint (through its metrics wrapper) knows whether
    # messages wait unread, and since when everything that arrived has been read.
    from fedbus.broker.metrics import CountingEndpoint, Metrics
    from fedbus.transport.endpoint import RouterEndpoint

    zctx = zmq.asyncio.Context()
    router = RouterEndpoint.bind(zctx, "tcp://127.0.0.1:0")
    ep = CountingEndpoint(router, Metrics())
    dealer = zctx.socket(zmq.DEALER, socket_class=zmq.Socket)
    dealer.connect(router.address)
    try:
        assert not ep.backlogged()
        for _ in range(3):
            dealer.send(encode(Heartbeat()))
        async with asyncio.timeout(10):
            while not ep.backlogged():
                await asyncio.sleep(0.01)
        drained = ep.drained_at
        for _ in range(3):
            assert isinstance((await ep.recv()).msg, Heartbeat)
        assert not ep.backlogged() and ep.drained_at == drained  # read, but no receive has found it empty yet
        waiting = asyncio.ensure_future(ep.recv())
        await asyncio.sleep(0.05)
        assert ep.drained_at > drained  # a receive found nothing unread
        dealer.send(encode(Heartbeat()))
        async with asyncio.timeout(10):
            assert isinstance((await waiting).msg, Heartbeat)
    finally:
        dealer.close(linger=0)
        router.close()
        zctx.term()


async def test_an_answer_to_a_peer_that_is_reconnecting_is_not_a_refusal(tmp_path: Path) -> None:
    # A heartbeat read after its site's connection closed (the site gave up and is reconnecting): the echo finds
    # no route. That is a lost answer, not a refused message: no warning, no audit record.
    cfg = BrokerConfig(bind="tcp://127.0.0.1:0", workspace=str(tmp_path / "b"), heartbeat_s=0.5, liveness=10)
    with structlog.testing.capture_logs() as logs:
        async with Broker(cfg) as broker:
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, b"site:s1")
            sock.connect(broker.address)
            sock.send(encode(Hello("site", "s1", "s1")))
            async with asyncio.timeout(10):
                while broker.registry.online() != ["s1"]:
                    await asyncio.sleep(0.02)
            hello_seen = broker.registry.sites["s1"].last_seen
            time.sleep(0.05)
            sock.send(encode(Heartbeat()))
            sock.close(linger=1000)  # delivered, then disconnected, while the broker's loop is held up
            ctx.term()
            time.sleep(0.5)
            with pytest.raises(PeerUnreachable):  # the route is gone before the loop reads the heartbeat
                await broker.router.send(b"site:s1", Heartbeat())
            async with asyncio.timeout(10):  # the loop reads it (a sign of life) and its echo finds no connection
                while broker.registry.sites["s1"].last_seen == hello_seen:
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
    assert not [e for e in logs if e["event"] == "message refused"]  # (nor its audit record: one branch)
