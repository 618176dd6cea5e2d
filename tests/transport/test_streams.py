"""Model streams over real sockets: bit-exact delivery, refusals, garbage, and models beyond 2 GiB."""

from __future__ import annotations

import asyncio
import concurrent.futures
from types import SimpleNamespace

import pytest
import torch
import zmq

from fedbus import digest
from fedbus.errors import TransportError
from fedbus.modelio.sinks import BufferSink
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.envelope import MAX_OFFER_ENVELOPE
from fedbus.protocol.messages import Chunk, Heartbeat
from fedbus.transport.endpoint import COPY_BELOW
from fedbus.transport.placement import placement_threads
from tests.transport.conftest import linked, memory_linked


def mixed_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "conv.weight": torch.randn(64, 3, 3, 3, generator=g),
        "fc.weight": torch.randn(300, 257, generator=g, dtype=torch.float64),
        "fc.bias": torch.randn(300, generator=g).half(),
        "emb": torch.randn(1000, 33, generator=g).bfloat16(),
        "steps": torch.tensor(12345678901, dtype=torch.int64),
        "i32": torch.randint(-(2**31), 2**31 - 1, (77,), generator=g, dtype=torch.int32),
        "i16": torch.randint(-(2**15), 2**15 - 1, (5, 5), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 127, (3,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (1001,), generator=g, dtype=torch.uint8),
        "mask": torch.rand(13, generator=g) > 0.5,
        "transposed": torch.randn(40, 50, generator=g).t(),
        "empty": torch.empty(0, 4),
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype, k
        assert got[k].shape == t.shape, k
        assert torch.equal(got[k], t.contiguous()), k


async def test_mixed_dtypes_round_trip_bit_exact(address: str) -> None:
    sd = mixed_state_dict()
    async with linked(address, chunk_size=64 << 10, window=256 << 10) as (router, dealer):
        await asyncio.wait_for(dealer.hub.send(b"", ModelSource.from_state_dict(sd)), 20)
        sink = await router.sinks.get()
        assert_same(await sink.result, sd)
        # and the other way: broker to site, addressed by routing id
        await asyncio.wait_for(router.hub.send(b"peer", ModelSource.from_state_dict(sd)), 20)
        sink = await dealer.sinks.get()
        got = await sink.result
        assert_same(got, sd)
        # received tensors are views of the one receive buffer, not copies
        base = sink.buffer.data_ptr()
        assert all(base <= t.data_ptr() < base + sink.buffer.numel() for t in got.values() if t.numel())


async def test_memory_transport_same_interface() -> None:
    async with memory_linked(chunk_size=4096, window=16384) as (a, b):
        sd = mixed_state_dict()
        await asyncio.wait_for(a.hub.send(b"b", ModelSource.from_state_dict(sd)), 10)
        assert_same(await (await b.sinks.get()).result, sd)


async def test_incompatible_offer_is_refused_before_any_payload(address: str) -> None:
    reference = {"w": torch.zeros(4, 4)}
    async with linked(address) as (router, dealer):

        async def strict(peer, offer):
            return BufferSink(max_total=1 << 20, expected=reference)

        router.hub.on_offer = strict
        with pytest.raises(TransportError, match="refused.*shape"):
            await asyncio.wait_for(dealer.hub.send(b"", ModelSource.from_state_dict({"w": torch.zeros(4, 5)})), 10)
        # the router keeps serving: a compatible model goes through
        good = {"w": torch.ones(4, 4)}
        captured = []

        async def capture(peer, offer):
            captured.append(BufferSink(max_total=1 << 20, expected=reference))
            return captured[-1]

        router.hub.on_offer = capture
        await asyncio.wait_for(dealer.hub.send(b"", ModelSource.from_state_dict(good)), 10)
        assert_same(await captured[0].result, good)


async def test_garbage_is_refused_and_the_router_keeps_serving(tmp_path) -> None:
    async with linked(f"ipc://{tmp_path}/g.sock") as (router, dealer):
        raw_ctx = zmq.Context()
        raw = raw_ctx.socket(zmq.DEALER)
        raw.connect(router.endpoint.address)
        garbage = [
            [b"\xc1\xff\x00"],
            [b"\x93\x01\x02\x03"],
            [b"\x84\xa1v\x01\xa1t\xa5chunk\xa2id\x00\xa3sid\xa1x"],
            [b"x" * (MAX_OFFER_ENVELOPE + 1)],  # over every cap: refused before msgpack sees it
            [],
        ]
        for frames in garbage:
            if frames:
                raw.send_multipart(frames)
        raw.close(linger=500)
        raw_ctx.term()
        await asyncio.sleep(0.3)
        assert len(router.bad) == 4
        assert any("exceeds" in str(b) for b in router.bad)
        sd = {"w": torch.arange(100_000, dtype=torch.float32)}
        await asyncio.wait_for(dealer.hub.send(b"", ModelSource.from_state_dict(sd)), 10)
        assert_same(await (await router.sinks.get()).result, sd)
        await dealer.endpoint.send(b"", Heartbeat())


@pytest.mark.slow
async def test_model_larger_than_2_gib(tmp_path) -> None:
    n = (2 << 30) + (64 << 20) + 8  # just over 2 GiB, not a multiple of the chunk
    big = torch.empty(n, dtype=torch.uint8)
    big.view(torch.int64)[: n // 8].copy_(torch.arange(n // 8, dtype=torch.int64))
    sd = {"big": big, "tail": torch.arange(10, dtype=torch.float32)}
    async with linked(f"ipc://{tmp_path}/big.sock") as (router, dealer):
        await asyncio.wait_for(dealer.hub.send(b"", ModelSource.from_state_dict(sd)), 120)
        got = await (await router.sinks.get()).result
        assert got["big"].numel() == n
        assert torch.equal(got["big"], big)
        assert torch.equal(got["tail"], sd["tail"])


def test_model_source_sums_are_lazy_cached_and_equal_to_an_eager_pass() -> None:
    model = {"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int8)}
    src = ModelSource.from_state_dict(model)
    sums = src.sums(64, "sum64")
    assert sums is src.sums(64, "sum64")  # one cache per chunking, shared by every send (a broadcast)
    assert sums._sums.count(None) == len(sums)  # nothing computed before a chunk is sent
    eager = digest.chunk_sums(src.layout.parts, 64, "sum64")
    assert list(sums) == [s for _, _, s in eager]
    assert sums.digest() == digest.stream_digest(eager, "sum64")


class CountingPool(concurrent.futures.ThreadPoolExecutor):
    """Placement threads that count what they were given."""

    def __init__(self) -> None:
        super().__init__(3, thread_name_prefix="test-place")
        self.submitted = 0

    def submit(self, *args, **kwargs):  # type: ignore[override]
        self.submitted += 1
        return super().submit(*args, **kwargs)


class CorruptOnce:
    """An outbox that flips one bit of the payload of each listed chunk offset the first time it is sent."""

    def __init__(self, endpoint, offsets: set[int]) -> None:
        self.endpoint, self.offsets, self.flipped = endpoint, set(offsets), []

    async def send(self, peer, msg, payload=()):
        if isinstance(msg, Chunk) and msg.off in self.offsets:
            self.offsets.discard(msg.off)
            self.flipped.append(msg.off)
            first = bytearray(payload[0])
            first[len(first) // 2] ^= 0x10
            payload = [first, *payload[1:]]
        await self.endpoint.send(peer, msg, payload)


@pytest.mark.parametrize("corrupt", [set(), {0, 5 << 20}])
async def test_placement_threads_deliver_bit_exact_and_resend_corrupt_chunks(address: str, corrupt: set[int]) -> None:
    """Chunks written by placement threads while the next ones arrive, over real sockets: bit-exact, and a
    chunk corrupted on the way (with later chunks already being written) is NACKed and sent again."""
    pool = CountingPool()
    sd = {"w": torch.randn(3 << 20, generator=torch.Generator().manual_seed(3)), "b": torch.arange(7.0)}
    try:
        async with linked(address, chunk_size=1 << 20, window=4 << 20, pool=pool) as (router, dealer):
            dealer.hub.endpoint = outbox = CorruptOnce(dealer.endpoint, corrupt)
            await asyncio.wait_for(dealer.hub.send(b"", ModelSource.from_state_dict(sd)), 30)
            assert_same(await (await router.sinks.get()).result, sd)
            assert sorted(outbox.flipped) == sorted(corrupt)
        assert pool.submitted >= 12  # 12 chunks written in threads (plus the sender's sums ahead)
    finally:
        pool.shutdown()


def test_model_source_sums_prefetched_by_threads_equal_an_eager_pass() -> None:
    model = {"w": torch.randn(10_000), "b": torch.ones(3, dtype=torch.int8)}
    src = ModelSource.from_state_dict(model)
    sums = src.sums(4096, "sum64")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        sums.prefetch(0, 3 * 4096, pool)
        sums.prefetch(4096, 1 << 30, pool)  # overlapping and past the end: each chunk once
        eager = digest.chunk_sums(src.layout.parts, 4096, "sum64")
        assert list(sums) == [s for _, _, s in eager]
    assert sums.digest() == digest.stream_digest(eager, "sum64")


def test_thread_counts_follow_the_cores_unless_the_environment_says(monkeypatch) -> None:
    from fedbus._cores import usable_cores
    from fedbus.transport.endpoint import io_threads

    monkeypatch.delenv("FEDBUS_IO_THREADS", raising=False)
    monkeypatch.delenv("FEDBUS_PLACEMENT_THREADS", raising=False)
    cores = usable_cores()
    assert io_threads() == (1 if cores < 8 else min(4, cores // 4))
    assert io_threads(server=True) == (1 if cores < 8 else min(8, 2 * min(4, cores // 4)))  # a broker's
    assert placement_threads() == (0 if cores < 4 else min(4, cores // 4))
    monkeypatch.setenv("FEDBUS_IO_THREADS", "3")
    monkeypatch.setenv("FEDBUS_PLACEMENT_THREADS", "0")
    assert (io_threads(), io_threads(server=True), placement_threads()) == (3, 3, 0)
    monkeypatch.setenv("FEDBUS_IO_THREADS", "0")  # zmq needs at least one
    monkeypatch.setenv("FEDBUS_PLACEMENT_THREADS", "many")  # logged, and the default used
    assert (io_threads(), placement_threads()) == (1, 0 if cores < 4 else min(4, cores // 4))


async def test_a_small_model_arrives_in_its_offer_frame_itself_and_a_corrupt_one_is_still_caught(address: str) -> None:
    # Over zmq a small inline frame is writable memory of zmq's own: it becomes the receive buffer, no copy made.
    sd = {
        "w": torch.randn(100, 100),
        "i": torch.arange(1000, dtype=torch.int64),
        "h": torch.randn(33).half(),
        "b": torch.tensor([True, False]),
    }
    async with linked(address) as (router, dealer):
        await asyncio.wait_for(dealer.hub.send(b"", ModelSource.from_state_dict(sd)), 10)
        sink = await router.sinks.get()
        assert_same(await sink.result, sd)
        assert isinstance(sink._view.base.obj, zmq.Frame)  # the buffer is the received frame
        # a flipped byte in the offer's bytes: caught by the digest, sent again as a chunk, delivered intact
        source = ModelSource.from_state_dict(sd)
        source.sums(dealer.hub.chunk_size, dealer.hub.alg).digest()  # the true sums, before the damage
        real_frames, sent = source.frames, []

        def corrupt_first(off: int, length: int) -> list:
            frames = real_frames(off, length)
            if not sent:
                bad = bytearray(b"".join(bytes(f) for f in frames))
                bad[-1] ^= 0xFF
                frames = [memoryview(bad)]
            sent.append(off)
            return frames

        source.frames = corrupt_first
        await asyncio.wait_for(dealer.hub.send(b"", source), 10)
        assert_same(await (await router.sinks.get()).result, sd)
        assert sent == [0, 0]  # the offer's bytes, then the same bytes again as an ordinary chunk


async def test_only_one_writable_aligned_frame_of_the_whole_stream_is_adopted() -> None:
    data = bytearray(range(256)) * 4
    offer = SimpleNamespace(total=len(data))
    assert BufferSink(max_total=1 << 20)._adopt(offer, [memoryview(data)])
    refused = {
        "read-only": [memoryview(bytes(data))],
        "two frames": [memoryview(data)[:512], memoryview(data)[512:]],
        "short": [memoryview(data)[:-8]],
        "misaligned": [memoryview(bytearray(len(data) + 1))[1:]],
    }
    big = bytearray(COPY_BELOW)  # a frame this large may be a zero-copy sender's own memory (inproc)
    refused["large"] = [memoryview(big)]
    for why, frames in refused.items():
        total = sum(f.nbytes for f in frames) if why == "large" else len(data)
        assert not BufferSink(max_total=1 << 20)._adopt(SimpleNamespace(total=total), frames), why
    assert not BufferSink(max_total=1 << 20, buffer=torch.empty(len(data), dtype=torch.uint8))._adopt(
        offer, [memoryview(data)]
    )  # a buffer handed in for reuse is used instead


async def test_a_sink_without_tensors_leaves_the_exact_file_and_builds_no_views(tmp_path) -> None:
    """``tensors=False`` (a site's inbox): the file is a valid safetensors file of the model and the result
    holds no tensor views of it, only its raw bytes."""
    from fedbus.modelio import serde

    model = mixed_state_dict()
    path = tmp_path / "inbox.safetensors"
    async with memory_linked(chunk_size=1 << 12, window=1 << 14) as (a, b):

        async def to_file(peer: bytes, offer: object) -> BufferSink:
            sink = BufferSink(max_total=1 << 30, path=str(path), tensors=False)
            b.sinks.put_nowait(sink)
            return sink

        b.hub.on_offer = to_file
        await asyncio.wait_for(a.hub.send(b"b", ModelSource.from_state_dict(model)), 10)
        got = await asyncio.wait_for((await b.sinks.get()).result, 10)
    assert dict(got) == {} and bytes(got.raw.numpy()) == path.read_bytes()
    assert_same(serde.read_file(path), model)
