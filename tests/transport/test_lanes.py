"""Lanes: stream chunks spread over several connections of one peer, and put back in order by the receiver."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import time

import numpy as np
import pytest
import torch
import zmq
import zmq.asyncio

from fedbus.errors import TransportError
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.envelope import decode
from fedbus.protocol.messages import Chunk, End, Heartbeat, Resume
from fedbus.transport import endpoint as endpoint_mod
from fedbus.transport.endpoint import LANE_MARK, LANE_STAGGER, DealerEndpoint, lane_base, stream_lanes
from tests.transport.conftest import linked, memory_linked
from tests.transport.test_streams import assert_same, mixed_state_dict

pytestmark = pytest.mark.timeout(60)


def model(megabytes: float, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(int(megabytes * (1 << 18)), generator=g), "b": torch.arange(11, dtype=torch.int16)}


def test_a_lane_id_names_the_connection_it_extends() -> None:
    assert lane_base(b"site:a:tok" + LANE_MARK + b"\x01") == b"site:a:tok"
    assert lane_base(b"site:a:tok" + LANE_MARK + b"\x07") == b"site:a:tok"
    for plain in (b"site:a:tok", b"\x00\x8b\x45\x67\x01", b"", b"lane", LANE_MARK):  # incl. libzmq's own 5-byte ids
        assert lane_base(plain) == plain


def test_lanes_follow_the_cores_unless_the_environment_says(monkeypatch) -> None:
    monkeypatch.delenv("FEDBUS_LANES", raising=False)
    for cores, want in ((2, 1), (7, 1), (8, 2), (64, 2)):
        monkeypatch.setattr(endpoint_mod, "usable_cores", lambda cores=cores: cores)
        assert stream_lanes() == want
    monkeypatch.setenv("FEDBUS_LANES", "3")
    assert stream_lanes() == 3
    monkeypatch.setenv("FEDBUS_LANES", "99")
    assert stream_lanes() == endpoint_mod.MAX_LANES
    monkeypatch.setenv("FEDBUS_LANES", "0")
    assert stream_lanes() == 1


async def test_a_dealer_spreads_chunks_over_its_lanes_and_sends_the_end_after_the_last() -> None:
    """Seen by a plain ROUTER: chunks in turn over the connection and its lanes (routing id + LANE_MARK + k),
    each stream's END on the connection of its last chunk, everything else on the first connection."""
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER, socket_class=zmq.Socket)
    router.bind("tcp://127.0.0.1:0")
    ep = DealerEndpoint.connect(ctx, router.getsockopt_string(zmq.LAST_ENDPOINT), identity=b"s", lanes=3)
    try:
        await _lanes_connected(ep)
        for off in range(0, 5 * 8, 8):
            await ep.send(b"", Chunk(1, off, 0), [bytes(8)])
        await ep.send(b"", End(1, "d"))
        await ep.send(b"", Heartbeat())
        await ep.send(b"", End(2, "d"))  # a stream whose chunks this endpoint never sent: the first connection
        seen = []
        for _ in range(8):
            assert router.poll(5000), "a message did not arrive"
            peer, envelope, *_ = router.recv_multipart()
            seen.append((peer, decode(envelope)[0]))
    finally:
        ep.close()
        router.close(linger=0)
        ctx.term()
    lane = [b"s", b"s" + LANE_MARK + b"\x01", b"s" + LANE_MARK + b"\x02"]
    chunks = sorted((m.off, peer) for peer, m in seen if isinstance(m, Chunk))
    assert [peer for _, peer in chunks] == [lane[1], lane[2], lane[0], lane[1], lane[2]]
    ends = {m.sid: peer for peer, m in seen if isinstance(m, End)}
    assert ends == {1: lane[2], 2: lane[0]}
    assert [peer for peer, m in seen if isinstance(m, Heartbeat)] == [lane[0]]


async def _lanes_connected(ep: DealerEndpoint) -> None:
    for _ in range(200):
        if ep.lanes_connected:
            return
        await asyncio.sleep(LANE_STAGGER)
    raise AssertionError("the lanes did not connect")


@pytest.mark.parametrize("transport", ["tcp", "inproc"])
async def test_chunks_sent_before_the_lanes_connect_go_over_the_first_connection(transport: str) -> None:
    """Lanes connect a few ms after the first connection; a chunk must not wait on one that has no connection yet
    (over inproc such a wait was never woken: the connect signals nothing to the waiting socket)."""
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER, socket_class=zmq.Socket)
    router.bind("tcp://127.0.0.1:0" if transport == "tcp" else f"inproc://lanes-{os.getpid()}")
    ep = DealerEndpoint.connect(ctx, router.getsockopt_string(zmq.LAST_ENDPOINT), identity=b"s", lanes=2)
    try:
        assert ep.lanes_connected is (transport == "inproc")  # inproc uses no I/O thread: at once
        await asyncio.wait_for(ep.send(b"", Chunk(1, 0, 0), [bytes(8)]), 5)
        await _lanes_connected(ep)
        await asyncio.wait_for(ep.send(b"", Chunk(1, 8, 0), [bytes(8)]), 5)
        over = {}
        for _ in range(2):
            assert router.poll(5000), "a chunk did not arrive"
            peer, envelope, _ = router.recv_multipart()
            over[decode(envelope)[0].off] = peer
    finally:
        ep.close()
        router.close(linger=0)
        ctx.term()
    lane = b"s" + LANE_MARK + b"\x01"
    assert over == ({0: b"s", 8: lane} if transport == "tcp" else {0: lane, 8: b"s"})


async def test_dealers_sharing_a_context_take_turns_over_its_io_threads() -> None:
    ctx = zmq.asyncio.Context(io_threads=3)
    router = ctx.socket(zmq.ROUTER, socket_class=zmq.Socket)
    router.bind("tcp://127.0.0.1:0")
    address = router.getsockopt_string(zmq.LAST_ENDPOINT)
    eps = [DealerEndpoint.connect(ctx, address, identity=b"s%d" % i, lanes=2) for i in range(2)]
    try:
        masks = [[ep.sock.getsockopt(zmq.AFFINITY), ep._lanes[0].sock.getsockopt(zmq.AFFINITY)] for ep in eps]
        assert masks == [[1, 2], [4, 1]]  # threads 0, 1, then 2 and 0 again
    finally:
        for ep in eps:
            ep.close()
        router.close(linger=0)
        ctx.term()


async def test_lanes_need_a_routing_id_and_a_sane_count() -> None:
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER, socket_class=zmq.Socket)
    router.bind("tcp://127.0.0.1:0")
    address = router.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        for bad in (0, endpoint_mod.MAX_LANES + 1):
            with pytest.raises(TransportError, match="lanes must be in"):
                DealerEndpoint.connect(ctx, address, lanes=bad)
        ep = DealerEndpoint.connect(ctx, address, lanes=2)  # no identity given: one is made up
        await ep.send(b"", Heartbeat())
        assert router.poll(5000)
        peer = router.recv_multipart()[0]
        assert peer.startswith(b"peer:") and lane_base(peer) == peer
        ep.close()
    finally:
        router.close(linger=0)
        ctx.term()


class Recorder:
    """An outbox that records what it sends."""

    def __init__(self, endpoint) -> None:
        self.endpoint, self.sent = endpoint, []

    async def send(self, peer, msg, payload=()):
        self.sent.append(msg)
        await self.endpoint.send(peer, msg, payload)


class Overtaking:
    """An outbox where a chunk is overtaken by the next two messages sent, as two connections may deliver:
    chunks, and an END (which a DealerEndpoint sends after its stream's last chunk, on that chunk's connection,
    so it never overtakes the last chunk itself). Records every message sent."""

    def __init__(self, endpoint, corrupt: int | None = None) -> None:
        self.endpoint, self.held, self.passed, self.sent = endpoint, None, 0, []
        self.corrupt = corrupt  # flip a bit of this chunk the first time it is sent
        self.overtaken_end = False  # an END went out while an earlier chunk was held

    async def send(self, peer, msg, payload=()):
        self.sent.append(msg)
        if isinstance(msg, Chunk) and msg.off == self.corrupt:
            self.corrupt, first = None, bytearray(payload[0])
            first[0] ^= 1
            payload = [first, *payload[1:]]
        if isinstance(msg, Chunk) and self.held is None:
            self.held, self.passed = (peer, msg, [bytes(p) for p in payload]), 0
            return
        if isinstance(msg, End) and self.held is not None:
            if self.passed == 0:
                await self._release()  # the held chunk is the last one: the END follows it
            else:
                self.overtaken_end = True
        await self.endpoint.send(peer, msg, payload)
        self.passed += 1
        if self.held is not None and (self.passed == 2 or isinstance(msg, End)):
            await self._release()

    async def _release(self) -> None:
        held, self.held = self.held, None
        await self.endpoint.send(*held)


@pytest.mark.parametrize("threads", [0, 2])
async def test_chunks_that_overtake_one_another_are_put_back_in_order_without_resends(threads: int) -> None:
    pool = concurrent.futures.ThreadPoolExecutor(threads) if threads else None
    try:
        async with memory_linked(chunk_size=4096, window=8 * 4096, pool=pool) as (a, b):
            a.hub.endpoint = outbox = Overtaking(a.endpoint)
            b.hub.endpoint = replies = Recorder(b.endpoint)
            for n in range(40_000, 44_000, 1000):  # a size whose chunks end with a pair: the END overtakes one
                sd = {**mixed_state_dict(), "big": torch.randn(n, generator=torch.Generator().manual_seed(1))}
                source = ModelSource.from_state_dict(sd)
                if -(-source.total // 4096) % 3 == 2:
                    break
            assert source.total > 20 * 4096 and source.total % 4096  # many chunks, the last one short
            await asyncio.wait_for(a.hub.send(b"b", source), 10)
            assert_same(await (await b.sinks.get()).result, sd)
    finally:
        if pool is not None:
            pool.shutdown()
    offsets = [m.off for m in outbox.sent if isinstance(m, Chunk)]
    assert sorted(offsets) == list(range(0, source.total, 4096))  # every chunk sent once: nothing re-sent
    assert not any(isinstance(m, Resume) for m in replies.sent)
    assert outbox.overtaken_end, "no END came before a chunk: the case this test is for did not happen"


async def test_a_corrupt_chunk_among_overtaken_ones_is_sent_again_and_the_model_arrives_exact() -> None:
    """Chunk 4 overtakes chunk 3 and lands corrupt: NACK, the stream rewinds below chunks already held ahead
    (5 may be), and the model still arrives bit-exact."""
    async with memory_linked(chunk_size=4096, window=8 * 4096) as (a, b):
        a.hub.endpoint = outbox = Overtaking(a.endpoint, corrupt=4 * 4096)
        sd = model(0.25)
        await asyncio.wait_for(a.hub.send(b"b", ModelSource.from_state_dict(sd)), 10)
        assert_same(await (await b.sinks.get()).result, sd)
    offsets = [m.off for m in outbox.sent if isinstance(m, Chunk)]
    assert offsets.count(4 * 4096) == 2 and outbox.corrupt is None


@pytest.mark.parametrize("lanes", [2, 3])
async def test_a_model_over_lanes_arrives_bit_exact_from_one_peer(address: str, lanes: int) -> None:
    sd = {**mixed_state_dict(), **model(3)}
    async with linked(address, lanes=lanes, chunk_size=128 << 10, window=1 << 20) as (router, dealer):
        source = ModelSource.from_state_dict(sd)
        await asyncio.wait_for(dealer.hub.send(b"", source), 30)
        sink = await router.sinks.get()
        assert_same(await sink.result, sd)
        # the layers above see the connection, not its lanes: one stream from b"peer", and the way back (downloads)
        assert sink.peer == b"peer" and router.sinks.empty()
        await asyncio.wait_for(router.hub.send(b"peer", ModelSource.from_state_dict(sd)), 30)
        assert_same(await (await dealer.sinks.get()).result, sd)
        assert not router.bad and not dealer.bad


def _io_threads(known: set[str] = frozenset(), count: int = 0) -> set[str]:
    """Thread ids of this process's libzmq I/O threads (other tests' contexts may have some); with ``count``, the
    ones not ``known``, once there are that many (a thread names itself once started)."""
    for _ in range(500):
        tids = set()
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith("ZMQbg/IO"):
                    tids.add(tid)
        if not count:
            return tids
        if len(tids - known) == count:
            return tids - known
        time.sleep(0.01)
    raise AssertionError(f"{len(tids - known)} new zmq I/O threads, not {count}")


def _cpu(tid: str) -> float:
    """CPU seconds of thread ``tid``: schedstat's nanoseconds, or stat's clock ticks where a kernel keeps none."""
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/self/task/{tid}/schedstat") as f:
        if ns := int(f.read().split()[0]):
            return ns / 1e9
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_each_lane_is_copied_by_an_io_thread_of_its_own() -> None:
    """libzmq gives a new connection the least-loaded I/O thread as counted once taken up, so connections made
    together landed on one thread, which then copied every lane's bytes (on the 16-core host the sender's two
    lanes shared one thread in every run). Each lane is now pinned to a thread and connected a little later."""
    others = _io_threads()
    receiver_ctx = zmq.Context()
    router = receiver_ctx.socket(zmq.ROUTER)
    router.bind("tcp://127.0.0.1:0")
    others |= _io_threads(others, 1)
    ctx = zmq.asyncio.Context(io_threads=2)
    ep = DealerEndpoint.connect(ctx, router.getsockopt_string(zmq.LAST_ENDPOINT), identity=b"s", lanes=2)
    sender_threads = sorted(_io_threads(others, 2))
    try:
        masks = [ep.sock.getsockopt(zmq.AFFINITY), *(lane.sock.getsockopt(zmq.AFFINITY) for lane in ep._lanes)]
        assert masks == [1, 2]
        assert ep._lanes[0].sock.getsockopt_string(zmq.LAST_ENDPOINT) == ""  # not connected yet: staggered
        await _lanes_connected(ep)
        start = {tid: _cpu(tid) for tid in sender_threads}
        payload = np.random.default_rng(1).integers(0, 255, 4 << 20, dtype=np.uint8)
        chunks = 64  # 256 MiB: each I/O thread's copies show in its CPU time
        received = 0
        for off in range(chunks):
            await ep.send(b"", Chunk(1, off, 0), [payload])
            while router.poll(0):
                router.recv_multipart(copy=False)
                received += 1
        while received < chunks:
            assert router.poll(5000), "a chunk did not arrive"
            router.recv_multipart(copy=False)
            received += 1
        used = {tid: _cpu(tid) - start[tid] for tid in sender_threads}
    finally:
        ep.close()
        ctx.term()
        router.close(linger=0)
        receiver_ctx.term()
    assert ep._lanes[0].sock.closed
    assert sum(used.values()) > 0 and min(used.values()) >= 0.1 * sum(used.values()), used  # before: 0.0-0.1 % on one
