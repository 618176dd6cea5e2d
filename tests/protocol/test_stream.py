"""The model-stream state machines, joined by a fake link (helpers.StreamPair) or driven by hand."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedbus.protocol as protocol
from fedbus.errors import LocalProtocolError, RemoteProtocolError
from fedbus.protocol import (
    Abort,
    Ack,
    Chunk,
    Credit,
    End,
    Hello,
    Nack,
    Offer,
    Receiver,
    ReceiverState,
    Resume,
    Sender,
    SenderState,
)
from fedbus.protocol import stream as stream_mod
from tests.protocol.helpers import Faults, StreamPair, chunk_sum, digest_fn, make_sender

DONE_S, DONE_R = SenderState.DONE, ReceiverState.DONE


def payload(n: int, seed: int = 0) -> bytes:
    return bytes((i * 131 + seed * 7 + (i >> 8)) & 0xFF for i in range(n))


def receiver_for(offer: Offer, *, window: int = 64, now: float = 0.0, **kw) -> Receiver:
    kw.setdefault("max_total", 1 << 20)
    kw.setdefault("min_chunk", 8)
    return Receiver(offer, window=window, now=now, digest_fn=digest_fn, **kw)


def accept(r: Receiver, data: bytes, off: int) -> Chunk | None:
    """A driver with placement threads: accept the chunk at ``off`` now, report it written later."""
    piece = data[off : off + r.chunk_length(off)]
    msg = Chunk(r.offer.sid, off, chunk_sum(piece))
    return msg if r.accept_chunk(msg, len(piece)) else None


def written(r: Receiver, data: bytes, msg: Chunk, now: float = 0.0, *, corrupt: bool = False) -> bool:
    return r.chunk_written(msg, chunk_sum(data[msg.off : msg.off + r.chunk_length(msg.off)]) ^ corrupt, now)


def feed(r: Receiver, data: bytes, off: int, now: float = 0.0, *, corrupt: bool = False) -> bool:
    """Deliver the chunk at ``off`` the way a driver does: accept, write, report the actual sum."""
    msg = accept(r, data, off)
    return msg is not None and written(r, data, msg, now, corrupt=corrupt)


# --- exact delivery ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [8, 24, 64])
@pytest.mark.parametrize("window", [1, 64, 200, 1 << 20])
@pytest.mark.parametrize("extra", [0, 1, 5])
@pytest.mark.parametrize("nchunks", [1, 2, 7])
def test_exact_delivery_grid(chunk: int, window: int, extra: int, nchunks: int) -> None:
    n = max(8, chunk * nchunks - (chunk - extra if extra else 0))
    data = payload(n, seed=chunk + window)
    pair = StreamPair(data, chunk=chunk, window=window).run()
    assert (pair.sender.state, pair.receiver.state) == (DONE_S, DONE_R)
    assert bytes(pair.buffer) == data
    assert pair.bytes_sent == n  # no fault, no chunk sent twice
    offs = [m.off for m in pair.sent_of(Chunk)]
    assert offs == list(range(0, n, chunk))
    credits = pair.sent_of(Credit)
    assert len(credits) <= math.ceil(n / chunk) + 1  # about one credit per chunk at most
    assert [c.until for c in credits] == sorted(c.until for c in credits)
    assert len(pair.sent_of(End)) == 1 and len(pair.sent_of(Ack)) == 1
    assert pair.now == 0.0  # nothing ever waited for a timeout


def test_window_rounding() -> None:
    offer = make_sender(payload(1000), chunk=64).offer()
    assert receiver_for(offer, window=0).window == 64
    assert receiver_for(offer, window=65).window == 128
    assert receiver_for(offer, window=128).window == 128
    assert receiver_for(offer, window=1).start() == [Credit(1, 64)]
    assert receiver_for(offer, window=1 << 20).start() == [Credit(1, 1000)]


# --- faults ------------------------------------------------------------------------------------------------

rates = st.floats(0.0, 0.2)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    drop=rates,
    duplicate=rates,
    reorder=rates,
    corrupt=rates,
    reconnect=st.floats(0.0, 0.02),
    chunk=st.sampled_from([8, 16, 40]),
    window=st.integers(1, 160),
    n=st.integers(8, 700),
    pipeline=st.sampled_from([0, 0, 1, 3]),
)
def test_faulty_link_delivers_exactly_or_fails_with_reason(
    seed: int,
    drop: float,
    duplicate: float,
    reorder: float,
    corrupt: float,
    reconnect: float,
    chunk: int,
    window: int,
    n: int,
    pipeline: int,
) -> None:
    """Whatever the faults, and whether chunks are written as they come or later by placement threads
    (``pipeline``), the receiver ends DONE with exactly the sent bytes or FAILED with a reason."""
    data = payload(n, seed=seed)
    faults = Faults(drop=drop, duplicate=duplicate, reorder=reorder, corrupt=corrupt, reconnect=reconnect)
    pair = StreamPair(data, chunk=chunk, window=window, faults=faults, seed=seed, pipeline=pipeline).run()
    s, r = pair.sender, pair.receiver
    if r.state is DONE_R:
        assert bytes(pair.buffer) == data
    else:
        assert r.state is ReceiverState.FAILED and r.failure
    if s.state is DONE_S:
        assert r.state is DONE_R
    else:
        assert s.state is SenderState.FAILED and s.failure


@pytest.mark.parametrize("pipeline", [0, 2])
@pytest.mark.parametrize("seed", range(12))
def test_moderate_faults_still_deliver(seed: int, pipeline: int) -> None:
    data = payload(1500, seed)
    faults = Faults(drop=0.05, duplicate=0.05, reorder=0.05, corrupt=0.05, reconnect=0.002)
    pair = StreamPair(data, chunk=32, window=96, faults=faults, seed=seed, pipeline=pipeline).run()
    assert (pair.sender.state, pair.receiver.state) == (DONE_S, DONE_R)
    assert bytes(pair.buffer) == data


def test_reconnect_resumes_from_the_verified_offset() -> None:
    data = payload(4000)
    pair = StreamPair(data, chunk=64, window=256)
    while pair.receiver.offset < 2000:
        assert pair.step()
    offset, before = pair.receiver.offset, pair.bytes_sent
    assert pair.to_receiver or pair.to_sender  # something in flight is lost
    mark = len(pair.sent)
    pair.reconnect()
    assert pair.sent[mark][1] == Resume(1, offset)
    pair.run()
    assert (pair.sender.state, pair.receiver.state) == (DONE_S, DONE_R)
    assert bytes(pair.buffer) == data
    resent = [m.off for _, m in pair.sent[mark:] if isinstance(m, Chunk)]
    assert min(resent) >= offset  # not from zero
    assert pair.bytes_sent - before <= len(data) - offset + pair.receiver.window


def test_corrupted_chunk_is_nacked_and_resent() -> None:
    data = payload(1000)
    pair = StreamPair(data, chunk=64, window=256, faults=Faults(corrupt_once=frozenset({128, 960}))).run()
    assert (pair.sender.state, pair.receiver.state) == (DONE_S, DONE_R)
    assert bytes(pair.buffer) == data
    assert pair.sent_of(Nack) == [
        Nack(1, 128, "chunk digest mismatch at offset 128"),
        Nack(1, 960, "chunk digest mismatch at offset 960"),
    ]
    offs = [m.off for m in pair.sent_of(Chunk)]
    assert offs.count(128) == 2 and offs.count(960) == 2 and offs.count(0) == 1


def test_always_corrupt_fails_with_reason() -> None:
    pair = StreamPair(payload(500), chunk=64, faults=Faults(corrupt=1.0)).run()
    assert pair.receiver.state is ReceiverState.FAILED
    assert pair.receiver.failure == "chunk digest mismatch at offset 0, 6 times"
    assert pair.sender.state is SenderState.FAILED
    assert pair.sender.failure == "peer aborted: chunk digest mismatch at offset 0, 6 times"


def test_stream_digest_mismatch_restarts_then_gives_up() -> None:
    pair = StreamPair(payload(300), chunk=64, sender_digest="not-the-digest", check_window=False).run()
    assert pair.receiver.failure == "stream digest mismatch, 6 times"
    assert pair.sender.failure == "peer aborted: stream digest mismatch, 6 times"
    assert pair.sent_of(Nack) == [Nack(1, 0, "stream digest mismatch")] * 5
    assert pair.bytes_sent == 300 * 6


def test_stream_digest_mismatch_resends_everything_under_fresh_credit() -> None:
    data = payload(200)
    s = make_sender(data, chunk=64)
    r = receiver_for(Offer(1, 200, 64, "crc32", "", data[:8]), window=64)  # an offer without digest
    r.start()
    for off in range(0, 200, 64):
        r.next_messages(0.0)
        assert feed(r, data, off)
    r.receive(End(1, "wrong"), 0.0)
    assert r.next_messages(0.0) == [Nack(1, 0, "stream digest mismatch"), Credit(1, 64)]
    assert r.offset == 0 and r.state is ReceiverState.RECEIVING
    for off in range(0, 200, 64):
        assert feed(r, data, off)
    r.receive(End(1, s.offer().digest), 1.0)
    assert r.state is DONE_R and r.next_messages(1.0) == [Credit(1, 200), Ack(1, s.offer().digest)]


def test_stall_on_a_dead_link_aborts_both_sides_with_reasons() -> None:
    pair = StreamPair(payload(500), chunk=64, faults=Faults(drop=1.0)).run()
    assert pair.sender.failure == "stalled: no credit for 30.0 s"
    assert pair.receiver.failure == "stalled: no data for 30.0 s"
    assert pair.now == 30.0
    aborts = pair.sent_of(Abort)
    assert Abort(1, "stalled: no credit for 30.0 s") in aborts and Abort(1, "stalled: no data for 30.0 s") in aborts


def test_sender_stalls_without_credit() -> None:
    s = make_sender(payload(100), chunk=64, now=10.0)
    assert s.next_messages(10.0) == [] and s.deadline() == 40.0
    assert s.next_messages(39.9) == [] and s.state is SenderState.OFFERED
    assert s.next_messages(40.0) == [Abort(1, "stalled: no credit for 30.0 s")]
    assert s.state is SenderState.FAILED and s.failure == "stalled: no credit for 30.0 s"
    assert s.deadline() is None and s.next_messages(100.0) == []


def test_sender_resends_end_then_stalls_without_ack() -> None:
    s = make_sender(payload(100), chunk=64)
    s.receive(Credit(1, 100), 0.0)
    assert [m.TYPE for m in s.next_messages(0.0)] == ["chunk", "chunk", "end"]
    assert s.state is SenderState.ENDED
    ends = 0
    now = 0.0
    while s.state is SenderState.ENDED:
        now = s.deadline()
        out = s.next_messages(now)
        ends += sum(isinstance(m, End) for m in out)
    assert ends == 5 and now == 30.0
    assert s.failure == "stalled: no ack for 30.0 s"


def test_receiver_probes_then_stalls() -> None:
    r = receiver_for(make_sender(payload(100), chunk=64).offer())
    assert r.start() == [Credit(1, 64)]
    probes = []
    while r.state is ReceiverState.RECEIVING:
        now = r.deadline()
        probes.append((now, r.next_messages(now)))
    assert [t for t, _ in probes] == [5.0, 10.0, 15.0, 20.0, 25.0, 30.0]
    assert all(out == [Resume(1, 0), Credit(1, 64)] for _, out in probes[:5])
    assert probes[-1][1] == [Abort(1, "stalled: no data for 30.0 s")]
    assert r.deadline() is None


def test_progress_resets_the_receiver_stall_clock() -> None:
    data = payload(200)
    r = receiver_for(make_sender(data, chunk=64).offer(), window=64)
    r.start()
    assert r.next_messages(25.0) == [Resume(1, 0), Credit(1, 64)]
    assert feed(r, data, 0, now=26.0)
    assert r.deadline() == 26.0  # a credit is queued
    r.next_messages(26.0)
    assert r.deadline() == 31.0 and r.state is ReceiverState.RECEIVING


# --- the sender, message by message ------------------------------------------------------------------------


def test_credit_gates_chunks_and_duplicates_are_harmless() -> None:
    s = make_sender(payload(300), chunk=64)
    assert s.offer().total == 300 and s.offer().chunk == 64
    s.receive(Credit(1, 64), 0.0)
    assert s.next_messages(0.0) == [Chunk(1, 0, chunk_sum(payload(300)[:64]))]
    s.receive(Credit(1, 192), 0.0)
    s.receive(Credit(1, 64), 0.0)  # reordered, stale: ignored
    assert [m.off for m in s.next_messages(0.0)] == [64, 128]
    assert s.next_messages(0.0) == [] and s.sent_until == 192 and s.credit == 192
    s.receive(Credit(1, 300), 0.0)
    assert [m.TYPE for m in s.next_messages(0.0)] == ["chunk", "chunk", "end"]
    assert s.chunk_length(256) == 44


def test_resume_rewinds_and_nack_voids_credit() -> None:
    s = make_sender(payload(300), chunk=64)
    s.receive(Credit(1, 256), 0.0)
    s.next_messages(0.0)
    s.receive(Resume(1, 128), 0.0)
    assert [m.off for m in s.next_messages(0.0)] == [128, 192]
    s.receive(Nack(1, 64, "chunk digest mismatch at offset 64"), 0.0)
    assert s.next_messages(0.0) == [] and s.credit == 64 and s.sent_until == 64
    s.receive(Credit(1, 256), 0.0)
    assert [m.off for m in s.next_messages(0.0)] == [64, 128, 192]


def test_ended_sender_rewinds_on_resume_and_nack_at_total() -> None:
    s = make_sender(payload(300), chunk=64)
    s.receive(Credit(1, 300), 0.0)
    s.next_messages(0.0)
    assert s.state is SenderState.ENDED
    s.receive(Resume(1, 300), 1.0)
    assert s.state is SenderState.SENDING
    assert [m.TYPE for m in s.next_messages(1.0)] == ["end"]
    s.receive(Nack(1, 300, "stream digest mismatch"), 2.0)  # at total: everything again
    assert s.state is SenderState.SENDING and s.sent_until == 0 and s.credit == 0
    s.receive(Credit(1, 128), 2.0)
    assert [m.off for m in s.next_messages(2.0)] == [0, 64]


def test_ack_after_a_late_resume_still_completes() -> None:
    s = make_sender(payload(100), chunk=64)
    s.receive(Credit(1, 100), 0.0)
    s.next_messages(0.0)
    s.receive(Resume(1, 100), 0.0)  # a stall probe that crossed the END
    s.receive(Ack(1, s.offer().digest), 0.0)
    assert s.state is DONE_S and s.next_messages(1.0) == [] and s.deadline() is None


def test_sender_gives_up_after_too_many_nacks() -> None:
    s = make_sender(payload(300), chunk=64)
    for _ in range(5):
        s.receive(Credit(1, 128), 0.0)
        s.next_messages(0.0)
        s.receive(Nack(1, 64, "bad"), 0.0)
    s.receive(Credit(1, 128), 0.0)
    s.next_messages(0.0)
    s.receive(Nack(1, 64, "bad"), 0.0)
    assert s.state is SenderState.FAILED and s.failure == "gave up after 6 nacks at offset 64: bad"
    assert s.next_messages(0.0) == [Abort(1, s.failure)]


def test_peer_abort_and_local_abort() -> None:
    s = make_sender(payload(100), chunk=64)
    s.receive(Abort(1, "disk full"), 0.0)
    assert s.state is SenderState.FAILED and s.failure == "peer aborted: disk full"
    assert s.next_messages(0.0) == [] and s.abort("again") == []
    r = receiver_for(make_sender(payload(100), chunk=64).offer())
    assert r.abort("shutting down") == [Abort(1, "shutting down")]
    assert r.state is ReceiverState.FAILED and r.resume(1.0) == [Abort(1, "shutting down")]


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (Credit(1, 301), "outside"),
        (Credit(1, -64), "outside"),
        (Credit(1, 100), "not a chunk boundary"),
        (Resume(1, 100), "not a chunk boundary"),
        (Resume(1, 256), "beyond the 128 bytes sent"),
        (Resume(1, -64), "not a chunk boundary"),
        (Nack(1, 12, "x"), "not a chunk boundary"),
        (Nack(1, 192, "x"), "beyond"),
        (Ack(1, "forged"), "ack digest"),
        (Chunk(1, 0, 0), "unexpected 'chunk'"),
        (End(1, "d"), "unexpected 'end'"),
        (Hello("site", "a", "s"), "unexpected 'hello'"),
    ],
)
def test_sender_rejects_hostile_messages(msg, match: str) -> None:
    s = make_sender(payload(300), chunk=64)
    s.receive(Credit(1, 128), 0.0)
    s.next_messages(0.0)
    with pytest.raises(RemoteProtocolError, match=match):
        s.receive(msg, 0.0)
    assert s.state is SenderState.SENDING and s.credit == 128 and s.sent_until == 128  # unchanged


def test_sender_rejects_early_ack_and_misrouted_messages() -> None:
    s = make_sender(payload(300), chunk=64)
    with pytest.raises(RemoteProtocolError, match="'ack' is not allowed in state offered"):
        s.receive(Ack(1, s.offer().digest), 0.0)
    s.receive(Credit(1, 128), 0.0)
    s.next_messages(0.0)
    with pytest.raises(RemoteProtocolError, match="before every byte"):
        s.receive(Ack(1, s.offer().digest), 0.0)
    with pytest.raises(LocalProtocolError, match="for stream 2"):
        s.receive(Credit(2, 64), 0.0)
    with pytest.raises(LocalProtocolError, match="not a chunk offset"):
        s.chunk_length(10)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"chunk_size": 0}, "multiple of 8"),
        ({"chunk_size": 60}, "multiple of 8"),
        ({"total": 4}, "total"),
        ({"header": b""}, "header"),
        ({"chunk_sums": [1]}, "1 chunk sums given for 2 chunks"),
        ({"digest": "x" * 300}, "digest"),
    ],
)
def test_sender_validates_its_arguments(kw: dict, match: str) -> None:
    args = {"header": b"12345678", "total": 100, "chunk_size": 64, "chunk_sums": [1, 2], "digest": "d", "now": 0.0}
    with pytest.raises(LocalProtocolError, match=match):
        Sender(1, **(args | kw))


def test_sender_checks_each_chunk_sum_when_its_chunk_is_due() -> None:
    s = Sender(1, header=b"12345678", total=100, chunk_size=64, chunk_sums=[1, "2"], digest="d", now=0.0)
    s.receive(Credit(1, 64), 0.0)
    assert [m.sum for m in s.next_messages(0.0)] == [1]  # type: ignore[attr-defined]
    s.receive(Credit(1, 100), 0.0)
    with pytest.raises(LocalProtocolError, match="chunk sum at 64 must be an int"):
        s.next_messages(0.0)


@pytest.mark.parametrize("seed", range(5))
def test_lazy_sums_and_digest_deliver_under_faults(seed: int) -> None:
    """Sums computed as chunks first leave, the digest at END: the offer names none, delivery is exact."""
    data = payload(1500, seed)
    faults = Faults(drop=0.05, duplicate=0.05, reorder=0.05, corrupt=0.05, reconnect=0.002)
    pair = StreamPair(data, chunk=32, window=96, faults=faults, seed=seed, lazy=True)
    assert pair.sender.offer().digest == ""
    pair.run()
    assert (pair.sender.state, pair.receiver.state) == (DONE_S, DONE_R)
    assert bytes(pair.buffer) == data
    sums = pair.sender._sums  # type: ignore[attr-defined]
    assert sums.digests == 1 and len(sums.computed) == len(sums)


# --- the receiver, message by message ----------------------------------------------------------------------


def test_gap_asks_for_resume_once_per_gap() -> None:
    data = payload(600)
    r = receiver_for(make_sender(data, chunk=64).offer(), window=640)
    r.start()
    assert feed(r, data, 0)
    r.next_messages(0.0)
    assert not feed(r, data, 128) and not feed(r, data, 192)  # 64 was lost
    assert r.next_messages(0.0) == [Resume(1, 64)]
    assert not feed(r, data, 256) and r.next_messages(0.0) == []  # suppressed until progress
    assert not feed(r, data, 0)  # duplicate: ignored
    assert feed(r, data, 64) and feed(r, data, 128)
    assert not feed(r, data, 320)
    assert r.next_messages(0.0) == [Resume(1, 192)]  # a new gap
    assert r.offset == 192


def test_receiver_corrupt_chunk_nacks_with_credit() -> None:
    data = payload(300)
    r = receiver_for(make_sender(data, chunk=64).offer(), window=128)
    assert r.start() == [Credit(1, 128)]
    assert feed(r, data, 0)
    assert r.next_messages(0.0) == [Credit(1, 192)]
    assert not feed(r, data, 64, corrupt=True)
    assert r.next_messages(0.0) == [Nack(1, 64, "chunk digest mismatch at offset 64"), Credit(1, 192)]
    assert not feed(r, data, 128) and r.next_messages(0.0) == []  # the nack covers this gap
    assert feed(r, data, 64) and r.offset == 128


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"total": 2 << 20}, "exceeds the 1048576-byte limit"),
        ({"total": 4}, "shorter than the 8-byte header"),
        ({"header": b""}, "empty header"),
        ({"chunk": 4}, "outside"),
        ({"chunk": 1 << 30}, "outside"),
        ({"chunk": 100}, "multiple of 8"),
        ({"alg": "md5"}, "unknown digest algorithm 'md5'"),
        ({"digest": "d" * 257}, "digest"),
    ],
)
def test_receiver_validates_the_untrusted_offer(change: dict, match: str) -> None:
    good = {"sid": 1, "total": 300, "chunk": 64, "alg": "crc32", "digest": "d", "header": b"12345678"}
    with pytest.raises(RemoteProtocolError, match=match):
        receiver_for(Offer(**(good | change)))


def test_receiver_rejects_hostile_chunks_and_messages() -> None:
    data = payload(300)
    r = receiver_for(make_sender(data, chunk=64).offer(), window=128)
    with pytest.raises(RemoteProtocolError, match="exceeds the credit 0"):
        r.accept_chunk(Chunk(1, 0, 0), 64)  # before any credit
    r.start()
    with pytest.raises(RemoteProtocolError, match="has 10 bytes, not 64"):
        r.accept_chunk(Chunk(1, 0, 0), 10)
    with pytest.raises(RemoteProtocolError, match="exceeds the credit 128"):
        r.accept_chunk(Chunk(1, 128, 0), 64)
    with pytest.raises(RemoteProtocolError, match="not a chunk boundary"):
        r.accept_chunk(Chunk(1, 32, 0), 64)
    with pytest.raises(RemoteProtocolError, match="not a chunk boundary"):
        r.accept_chunk(Chunk(1, 320, 0), 64)
    with pytest.raises(RemoteProtocolError, match="unexpected 'credit'"):
        r.receive(Credit(1, 64), 0.0)
    with pytest.raises(RemoteProtocolError, match="unexpected 'offer'"):
        r.receive(Offer(1, 1, 64, "crc32", "", b"x"), 0.0)
    with pytest.raises(LocalProtocolError, match="for stream 9"):
        r.accept_chunk(Chunk(9, 0, 0), 64)
    with pytest.raises(LocalProtocolError, match="accept_chunk"):
        r.receive(Chunk(1, 0, 0), 0.0)
    with pytest.raises(LocalProtocolError, match="offset 0 is next"):
        r.chunk_written(Chunk(1, 64, 0), 0, 0.0)
    with pytest.raises(LocalProtocolError, match="twice"):
        r.start()
    assert r.state is ReceiverState.RECEIVING and r.offset == 0


def test_end_with_missing_bytes_asks_to_resume() -> None:
    data = payload(300)
    s = make_sender(data, chunk=64)
    r = receiver_for(s.offer(), window=320)
    r.start()
    assert feed(r, data, 0)
    r.next_messages(0.0)
    r.receive(End(1, s.offer().digest), 0.0)
    assert r.next_messages(0.0) == [Resume(1, 64)]


def test_chunks_accepted_while_earlier_ones_are_still_being_written() -> None:
    """Placement threads: the next chunk is accepted before the one before it is written; credit and the
    verified offset move only as chunks are reported written, in order."""
    data = payload(300)
    s = make_sender(data, chunk=64)
    r = receiver_for(s.offer(), window=128)
    r.start()
    placing = [accept(r, data, off) for off in (0, 64)]
    assert all(placing) and r.offset == 0 and r.next_messages(0.0) == []
    assert accept(r, data, 64) is None  # a duplicate of an accepted chunk is not placed twice
    assert written(r, data, placing[0]) and r.offset == 64
    assert r.next_messages(0.0) == [Credit(1, 192)]
    assert accept(r, data, 128) and written(r, data, placing[1]) and r.offset == 128


def test_end_waits_for_chunks_still_being_written() -> None:
    """END after every chunk was accepted but not yet written: no resume (nothing is missing), the ACK
    once the last chunk is in place."""
    data = payload(300)
    s = make_sender(data, chunk=64)
    r = receiver_for(s.offer(), window=320)
    r.start()
    placing = [accept(r, data, off) for off in range(0, 300, 64)]
    r.receive(End(1, s.offer().digest), 0.0)
    assert r.next_messages(0.0) == []
    for msg in placing:
        assert msg is not None and written(r, data, msg)
    assert r.state is DONE_R and r.next_messages(0.0) == [Ack(1, s.offer().digest)]


def test_a_corrupt_chunk_voids_the_chunks_accepted_after_it() -> None:
    """Chunk 64 lands corrupt while 128 and 192 are being written: NACK(64); the later two are ignored when
    they land (they will come again) and the re-sent 64 is accepted."""
    data = payload(300)
    r = receiver_for(make_sender(data, chunk=64).offer(), window=320)
    r.start()
    placing = [accept(r, data, off) for off in (0, 64, 128, 192)]
    assert written(r, data, placing[0])
    assert not written(r, data, placing[1], corrupt=True)
    assert [type(m) for m in r.next_messages(0.0)] == [Nack, Credit]
    assert not written(r, data, placing[2]) and not written(r, data, placing[3]) and r.offset == 64
    again = accept(r, data, 64)
    assert again is not None and written(r, data, again) and r.offset == 128


def test_a_gap_resumes_after_the_accepted_chunks() -> None:
    data = payload(600)
    r = receiver_for(make_sender(data, chunk=64).offer(), window=640)
    r.start()
    assert accept(r, data, 0) and accept(r, data, 64)
    assert accept(r, data, 192) is None  # 128 was lost; 0 and 64 are still being written
    assert r.next_messages(0.0) == [Resume(1, 128)]


def test_a_chunk_ahead_of_the_next_is_told_apart_and_checked_like_any_chunk() -> None:
    """Chunks spread over several connections overtake one another: ``ahead`` says which to hold back (valid,
    beyond ``arrived``), without accepting it or asking for a resume, and refuses what no sender sends."""
    data = payload(600)
    r = receiver_for(make_sender(data, chunk=64).offer(), window=256)
    assert r.start() == [Credit(1, 256)]
    chunk = r.chunk_length(0)
    assert not r.ahead(Chunk(1, 0, 0), chunk) and r.ahead(Chunk(1, 128, 0), chunk) and r.arrived == 0
    assert r.next_messages(0.0) == []  # no resume asked: nothing is taken as lost
    assert accept(r, data, 0) and r.arrived == 64 and not r.ahead(Chunk(1, 64, 0), chunk)
    assert not r.ahead(Chunk(1, 0, 0), chunk)  # behind: a duplicate, for accept_chunk to drop
    with pytest.raises(RemoteProtocolError, match="exceeds the credit 256"):
        r.ahead(Chunk(1, 256, 0), chunk)
    with pytest.raises(RemoteProtocolError, match="not a chunk boundary"):
        r.ahead(Chunk(1, 100, 0), chunk)
    with pytest.raises(RemoteProtocolError, match="has 10 bytes"):
        r.ahead(Chunk(1, 128, 0), 10)
    with pytest.raises(LocalProtocolError, match="takes a Chunk"):
        r.ahead(End(1, ""), 0)  # type: ignore[arg-type]
    # held back and taken in order later, the chunks verify as if they had come in order
    for off in (64, 128, 192):
        assert accept(r, data, off)
    assert r.arrived == 256


def test_reoffer_is_answered_with_where_we_are() -> None:
    data = payload(300)
    r = receiver_for(make_sender(data, chunk=64).offer(), window=128)
    r.start()
    assert feed(r, data, 0)
    r.next_messages(0.0)
    r.receive(r.offer, 1.0)
    assert r.next_messages(1.0) == [Resume(1, 64), Credit(1, 192)]


def test_late_duplicates_after_done_are_ignored() -> None:
    data = payload(700)
    pair = StreamPair(data, chunk=64, window=128).run()
    s, r = pair.sender, pair.receiver
    assert (s.state, r.state) == (DONE_S, DONE_R)
    for _, msg in pair.sent:
        if isinstance(msg, Chunk):
            assert not r.accept_chunk(msg, r.chunk_length(msg.off))
        elif isinstance(msg, End | Abort | Offer):
            r.receive(msg, 99.0)
        else:
            s.receive(msg, 99.0)
    assert (s.state, r.state) == (DONE_S, DONE_R) and bytes(pair.buffer) == data
    assert s.next_messages(99.0) == [] and s.deadline() is None
    assert r.next_messages(99.0) == [Ack(1, s.offer().digest)]  # a duplicate END is acked again
    assert r.deadline() is None and r.resume(100.0) == [Ack(1, s.offer().digest)]


def test_public_api_is_pinned() -> None:
    assert set(stream_mod.__all__) == {
        "MAX_DIGEST_LEN",
        "DigestFn",
        "Receiver",
        "ReceiverState",
        "Sender",
        "SenderState",
    }
    for name in protocol.__all__:
        assert hasattr(protocol, name), name
    assert {"encode", "decode", "MAX_ENVELOPE", "Sender", "Receiver", "Offer", "MESSAGE_TYPES"} <= set(protocol.__all__)
