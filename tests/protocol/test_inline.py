"""The inline fast path: a stream of one chunk travels in its offer and is acknowledged at once; every other
case falls back to the ordinary credit/chunk/end exchange without an extra message."""

from __future__ import annotations

import pytest

from fedbus.errors import LocalProtocolError, RemoteProtocolError
from fedbus.protocol import Ack, Chunk, Credit, End, Receiver, ReceiverState, Sender, SenderState
from tests.protocol.helpers import chunk_sum, digest_fn, roundtrip

DATA = bytes(range(256)) * 40  # 10240 bytes


def _sender(data: bytes = DATA, *, chunk: int = 16384, inline: bool = True) -> Sender:
    sums = [chunk_sum(data[o : o + chunk]) for o in range(0, len(data), chunk)]
    digest = digest_fn((o, len(data[o : o + chunk]), s) for o, s in zip(range(0, len(data), chunk), sums, strict=True))
    return Sender(
        7, header=data[:8], total=len(data), chunk_size=chunk, chunk_sums=sums, digest=digest, alg="crc32", now=0.0,
        inline=inline,
    )  # fmt: skip


def _receiver(sender: Sender) -> Receiver:
    return Receiver(roundtrip(sender.offer()), window=4096, now=0.0, digest_fn=digest_fn, max_total=1 << 30)


def test_one_round_trip_when_the_receiver_takes_the_bytes() -> None:
    tx = _sender()
    rx = _receiver(tx)
    assert tx.inline and rx.accept_inline(len(DATA))
    replies = rx.inline_written(chunk_sum(DATA), 0.1)
    assert replies == [Ack(7, tx.offer().digest)] and rx.state is ReceiverState.DONE and rx.offset == len(DATA)
    tx.receive(roundtrip(replies[0]), 0.2)
    assert tx.state is SenderState.DONE and tx.next_messages(0.3) == []
    assert rx.verified == [(0, len(DATA), chunk_sum(DATA))]


@pytest.mark.parametrize("why", ["corrupt", "not_whole", "old_receiver"])
def test_everything_else_falls_back_to_the_ordinary_stream(why: str) -> None:
    tx = _sender()
    rx = _receiver(tx)
    length = len(DATA) - 8 if why == "not_whole" else len(DATA)
    if why == "corrupt":
        assert rx.accept_inline(length)
        assert rx.inline_written(chunk_sum(DATA) ^ 1, 0.1) == []  # not acknowledged, not started
    elif why != "old_receiver":  # an older receiver never looks at the offer's payload
        assert not rx.accept_inline(length)
    (credit,) = rx.start()
    assert isinstance(credit, Credit)
    tx.receive(roundtrip(credit), 0.2)
    chunk, end = tx.next_messages(0.2)
    assert isinstance(chunk, Chunk) and isinstance(end, End)
    assert rx.accept_chunk(chunk, len(DATA)) and rx.chunk_written(chunk, chunk_sum(DATA), 0.3)
    rx.receive(roundtrip(end), 0.3)
    (ack,) = [m for m in rx.next_messages(0.3) if isinstance(m, Ack)]
    tx.receive(roundtrip(ack), 0.4)
    assert rx.state is ReceiverState.DONE and tx.state is SenderState.DONE


def test_an_ack_to_an_ordinary_offer_is_the_peers_fault() -> None:
    tx = _sender(inline=False)
    with pytest.raises(RemoteProtocolError, match="not allowed in state offered"):
        tx.receive(Ack(7, tx.offer().digest), 0.1)
    assert tx.state is SenderState.OFFERED


def test_inline_needs_one_chunk_and_a_known_digest() -> None:
    with pytest.raises(LocalProtocolError, match="inline"):
        _sender(chunk=4096)  # 10240 bytes are three chunks
    rx = _receiver(_sender())
    rx.start()
    with pytest.raises(LocalProtocolError, match="after start"):
        rx.accept_inline(len(DATA))
