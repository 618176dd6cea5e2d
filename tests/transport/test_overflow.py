"""A peer that never reads: a ROUTER drops what does not fit and cuts the peer off, never waits; a DEALER's send
waits a bounded time. Pure bookkeeping (``Overflow``) without sockets; the endpoints over real tcp sockets."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from fedbus.protocol.envelope import encode
from fedbus.protocol.messages import Heartbeat
from fedbus.transport.endpoint import DealerEndpoint, PeerOverflow, RouterEndpoint, SendStalled
from fedbus.transport.overflow import Overflow

BIG = b"x" * (64 << 10)  # fills the kernel's socket buffers in a few hundred messages


# --- pure -----------------------------------------------------------------------------------------------------


def test_a_peer_is_cut_off_only_after_staying_full() -> None:
    o = Overflow(stuck_after=5.0, cooldown=60.0)
    assert not o.full(b"p", 100.0)
    assert not o.full(b"p", 104.9)
    o.sent(b"p")  # it read again: the clock starts over
    assert not o.full(b"p", 106.0)
    assert not o.cut_off(b"p", 106.0)
    assert o.full(b"p", 111.0)  # full since 106
    assert o.cut_off(b"p", 111.0) and o.cut_off(b"p", 170.9)
    assert not o.cut_off(b"p", 171.0)  # the cool-down passed
    assert (o.dropped[b"p"], o.dropped_total, o.cut_off_total) == (4, 4, 1)
    assert not o.cut_off(b"q", 111.0)


def test_counts_stay_bounded_under_made_up_peers() -> None:
    o = Overflow(stuck_after=0.0, cooldown=1.0, max_peers=8)
    for i in range(1000):
        o.full(f"peer-{i}".encode(), float(i))
    assert len(o.dropped) == 8 and o.dropped_total == 1000
    assert len(o._cut_off) <= 4 * 8 + 1 and len(o._full_since) <= 4 * 8
    assert o.cut_off_now(999.5) == 1


# --- real sockets -------------------------------------------------------------------------------------------


def _non_reader(ctx: zmq.asyncio.Context, address: str, identity: bytes) -> zmq.Socket:
    """A raw DEALER that says one thing and then never reads, with the smallest queues it can have."""
    sock = ctx.socket(zmq.DEALER, socket_class=zmq.Socket)  # type: ignore[arg-type]
    sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    sock.send(encode(Heartbeat(), 1))
    return sock


@pytest.mark.asyncio
async def test_router_drops_for_a_non_reader_and_cuts_it_off_without_waiting() -> None:
    ctx = zmq.asyncio.Context()
    router = RouterEndpoint.bind(ctx, "tcp://127.0.0.1:0", hwm=20, stuck_after=0.3, cooldown=30.0)
    stuck: list[bytes] = []
    router.on_stuck = stuck.append
    bad = _non_reader(ctx, router.address, b"bad")
    good = DealerEndpoint.connect(ctx, router.address, identity=b"good")
    ticks = 0

    async def ticker() -> None:  # the loop keeps running while the router sends
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    tick = asyncio.ensure_future(ticker())
    try:
        assert (await asyncio.wait_for(router.recv(), 10)).peer == b"bad"
        dropped = 0
        async with asyncio.timeout(30):
            while not stuck:
                try:
                    await router.send(b"bad", Heartbeat(), [BIG])
                except PeerOverflow:
                    dropped += 1
                    await asyncio.sleep(0.01)
        assert stuck == [b"bad"] and dropped >= 2
        assert router.overflow.dropped[b"bad"] == dropped and router.overflow.cut_off_total == 1
        assert router.cut_off(b"bad")
        with pytest.raises(PeerOverflow):  # cut off: not even tried
            await router.send(b"bad", Heartbeat())
        assert router.overflow.ignored_total == 1
        # what a cut-off peer sends is dropped unread; another peer is served as before
        bad.send(encode(Heartbeat(), 2))
        await good.send(b"", Heartbeat())
        inc = await asyncio.wait_for(router.recv(), 10)
        assert inc.peer == b"good" and inc.size > 0
        await router.send(b"good", Heartbeat())
        assert isinstance((await asyncio.wait_for(good.recv(), 10)).msg, Heartbeat)
        assert ticks > 0
    finally:
        tick.cancel()
        bad.close(0)
        good.close()
        router.close()
        ctx.destroy(linger=0)


@pytest.mark.asyncio
async def test_dealer_send_waits_a_bounded_time_for_a_peer_that_never_reads() -> None:
    ctx = zmq.asyncio.Context()
    sink = ctx.socket(zmq.ROUTER, socket_class=zmq.Socket)  # type: ignore[arg-type]
    sink.setsockopt(zmq.RCVHWM, 1)
    sink.setsockopt(zmq.RCVBUF, 4096)
    sink.setsockopt(zmq.LINGER, 0)
    port = sink.bind_to_random_port("tcp://127.0.0.1")
    dealer = DealerEndpoint.connect(ctx, f"tcp://127.0.0.1:{port}", identity=b"d")
    dealer.sock.setsockopt(zmq.SNDHWM, 5)
    dealer.send_timeout = 0.3
    try:
        with pytest.raises(SendStalled):
            async with asyncio.timeout(30):
                while True:
                    await dealer.send(b"", Heartbeat(), [BIG])
    finally:
        dealer.close()
        sink.close(0)
        ctx.destroy(linger=0)


@pytest.mark.asyncio
async def test_a_script_that_never_reads_cannot_hold_its_site(tmp_path) -> None:
    """The site's link (a ROUTER on ipc, ``SiteFolder.bind_link``) answering every message of a script that
    floods it and never reads: the answers that do not fit are dropped, the script is cut off, the loop runs."""
    from fedbus.daemon import answer_messages
    from fedbus.protocol.messages import Error
    from fedbus.transport.link import LinkSocket

    ctx = zmq.asyncio.Context()
    link = RouterEndpoint.bind(ctx, f"ipc://{tmp_path}/link.sock", hwm=100, stuck_after=0.3)
    stuck: list[bytes] = []
    link.on_stuck = stuck.append

    async def answer(inc) -> None:  # what the runner does with a message it refuses: answers it
        await link.send(inc.peer, Error("refused", "x" * 4000))

    async def refuse(peer, inc, exc) -> None:  # a dropped answer: the runner logs it and reads on
        assert isinstance(exc, PeerOverflow)

    server = asyncio.ensure_future(answer_messages(link, answer, refuse, answered=(PeerOverflow,)))
    script = LinkSocket(link.address, send_timeout=5.0)
    script.sock.setsockopt(zmq.RCVHWM, 1)
    try:
        async with asyncio.timeout(30):
            i = 0
            while not stuck:
                i += 1
                script.send_now(encode(Heartbeat(), i))
                if i % 100 == 0:
                    await asyncio.sleep(0.01)  # the loop serves the link meanwhile
        assert link.overflow.cut_off_total == 1 and not server.done()
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        script.close()
        link.close()
        ctx.destroy(linger=0)
