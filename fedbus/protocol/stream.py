"""Model streams: one model's bytes moved in chunks under byte-counted credit, as two sans-IO state machines.

Theory of operation
-------------------
A stream carries ``total`` bytes (a safetensors file: ``header`` first, then the tensors' memory) from a
``Sender`` to a ``Receiver``. Neither machine touches a socket, a clock or the payload: the driver (the asyncio
pump in ``fedbus.transport``) feeds them decoded messages and the current time ``now``, asks them which messages
to send next, and moves the payload bytes itself. The machines only reason about offsets, lengths and digests.

    sender                                   receiver
    OFFER(sid, total, chunk, alg, digest, header)  ->   validate (sizes, alg, digest)
                                             <-   CREDIT(until)                    cumulative byte offset
    CHUNK(off, sum) + payload [off, off+L)   ->   accept_chunk? write, chunk_written(actual sum)
    ...                                      <-   CREDIT(until)                    about one per chunk
    END(digest)                              ->   digest_fn(all (off, len, sum)) == digest?
                                             <-   ACK(digest)  |  NACK(off, reason)
    RESUME(off) from the receiver: continue from ``off`` (reconnect, gap, stall probe).
    ABORT(reason) from either side ends the stream.

Chunks start at multiples of ``chunk``; the last one is shorter. Every quantity a peer sends is an absolute
offset, never a delta, so duplicated or reordered messages are harmless: credit is the max of all credits
seen, a duplicate chunk (below the expected offset) is ignored, a chunk beyond it reveals a gap.

Flow control. The receiver grants credit up to ``verified offset + window`` (window rounded up to whole chunks)
and re-grants whenever a full chunk of window is free again. The sender sends a chunk only when its end fits in
the credit, so at most ``window`` bytes are ever in flight beyond what the receiver has verified.

Placement. Writing a chunk may take longer than receiving the next (a driver with placement threads), so
accepting and verifying are two steps: ``accept_chunk`` takes the next chunk in order and the driver writes it
where it likes; ``chunk_written`` (called in acceptance order) reports the sum of what landed. Chunks accepted
but not yet written count as arrived, not verified: credit still follows the verified offset, an END that comes
while they are being written is answered once they are, and a NACK or resume voids the chunks accepted after
the offset it names (their late reports are ignored; they will be sent again).

Recovery. The receiver verifies every chunk's digest before advancing. A corrupt chunk is answered with
NACK(off); a gap (a chunk beyond the expected offset) with RESUME(expected), once per gap. A NACK voids the
sender's credit beyond its offset (credit is counted from the receiver's position, which moved back), so the
receiver always follows a NACK with a CREDIT restating its grant. A whole-stream digest mismatch at END resets
the receiver to offset 0 and is answered NACK(0) + CREDIT; NACK(total) also means "everything again".

Liveness. ``stall_timeout`` is, on both sides, the silence after which a side gives the stream up and sends
ABORT. Before that each side probes: the receiver, when no verified chunk arrived for
``stall_timeout / (max_retries + 1)``, sends RESUME(expected) + CREDIT (which also repairs a lost credit, chunk or
END); the sender, while waiting for the ACK, re-sends END on the same schedule (which repairs a lost ACK: a
receiver that is DONE answers a duplicate END with the ACK again). So one lost message costs one probe interval,
never the stream. ``deadline()`` says when ``next_messages`` must be called at the latest; a deadline at or
before the last ``now`` means "call it now".

Small models (the inline fast path). A stream of at most one chunk may travel inside its offer: the sender
(``inline=True``) attaches the whole stream to the OFFER as its payload, and a receiver whose window holds it
(``accept_inline``) writes it and answers ACK at once (``inline_written``): one round trip instead of
OFFER / CREDIT / CHUNK / END / ACK. The offer's digest covers the bytes. Anything else falls back to the
ordinary stream with no extra message: a receiver that does not take the bytes (an older peer, a digest
mismatch) just grants credit, and the sender, still in OFFERED, sends the chunk.

    OFFER(..., digest) + payload [0, total)  ->   accept_inline? write, inline_written(actual sum)
                                             <-   ACK(digest)          (or CREDIT: the ordinary stream)

Errors. Misuse by the driver (wrong sid, calls out of order) raises ``LocalProtocolError``; anything the peer
sent that no correct peer sends raises ``RemoteProtocolError`` and leaves the machine unchanged (the driver
usually answers with ``abort()``). Messages arriving after DONE or FAILED are ignored: late duplicates are
normal. State changes go through a transition table (the h11 move): an event a state does not list is illegal.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from fedbus.errors import LocalProtocolError, RemoteProtocolError
from fedbus.protocol.messages import Abort, Ack, Chunk, Credit, End, Message, Nack, Offer, Resume

__all__ = ["MAX_DIGEST_LEN", "DigestFn", "Receiver", "ReceiverState", "Sender", "SenderState"]

DigestFn = Callable[[Iterable[tuple[int, int, int]]], str]
"""Whole-stream digest from the (offset, length, chunk sum) triples in offset order (injected by the driver)."""

MAX_DIGEST_LEN = 256


class SenderState(enum.Enum):
    OFFERED = "offered"  # offer made, no credit yet
    SENDING = "sending"  # sending chunks as credit allows
    ENDED = "ended"  # every byte and END sent, waiting for the ACK
    DONE = "done"  # acknowledged
    FAILED = "failed"  # aborted by either side; ``failure`` says why


class ReceiverState(enum.Enum):
    RECEIVING = "receiving"
    DONE = "done"  # every byte verified, ACK scheduled
    FAILED = "failed"


class ChunkSumTable(Protocol):
    """A sender's chunk sums: how many there are, and chunk ``k``'s, asked for as the chunk leaves (so they may
    be computed lazily). A list of ints is one."""

    def __len__(self) -> int: ...

    def __getitem__(self, k: int, /) -> int: ...


_S, _R = SenderState, ReceiverState
_State = TypeVar("_State", SenderState, ReceiverState)

# state -> event -> next state. A missing event is illegal in that state (raised as the peer's fault).
_SENDER: dict[SenderState, dict[str, SenderState]] = {
    _S.OFFERED: {"credit": _S.SENDING, "rewind": _S.SENDING, "ack": _S.DONE, "fail": _S.FAILED},
    _S.SENDING: {"credit": _S.SENDING, "rewind": _S.SENDING, "sent_all": _S.ENDED, "ack": _S.DONE, "fail": _S.FAILED},
    _S.ENDED: {"credit": _S.ENDED, "rewind": _S.SENDING, "ack": _S.DONE, "fail": _S.FAILED},
    _S.DONE: {},
    _S.FAILED: {},
}
_RECEIVER: dict[ReceiverState, dict[str, ReceiverState]] = {
    _R.RECEIVING: {"verified": _R.DONE, "fail": _R.FAILED},
    _R.DONE: {},
    _R.FAILED: {},
}


def _fire(table: dict[_State, dict[str, _State]], state: _State, event: str, sid: int) -> _State:
    try:
        return table[state][event]
    except KeyError:
        raise RemoteProtocolError(f"stream {sid}: {event!r} is not allowed in state {state.value}") from None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_digest(x: object) -> bool:
    return isinstance(x, str) and len(x) <= MAX_DIGEST_LEN


def _sid_of(msg: Message, sid: int) -> None:
    other = getattr(msg, "sid", sid)
    if other != sid:
        raise LocalProtocolError(f"stream {sid}: got a {msg.TYPE!r} message for stream {other} (misrouted)")


class Sender:
    """The sending half of a stream: turns credit into chunk announcements; the driver attaches the bytes."""

    MAX_RETRIES = 5  # nacks for one offset before giving up; also sets the END re-send interval

    def __init__(
        self,
        sid: int,
        *,
        header: bytes,
        total: int,
        chunk_size: int,
        chunk_sums: ChunkSumTable,
        digest: str | Callable[[], str],
        alg: str = "sum64",
        route: dict | None = None,
        now: float,
        stall_timeout: float = 30.0,
        resumed: bool = False,
        inline: bool = False,
    ) -> None:
        """``resumed``: this stream was begun by an earlier process (a site killed mid-upload and started
        again), so the receiver may ask to resume from any offset, not only from what this one has sent.
        ``inline``: the driver sends the whole stream (at most one chunk) with the offer; the digest must
        then be known up front (a str)."""

        def need(ok: bool, what: str) -> None:
            if not ok:
                raise LocalProtocolError(f"stream {sid}: {what}")

        need(_is_int(sid), "sid must be an int")
        need(
            _is_int(chunk_size) and chunk_size > 0 and chunk_size % 8 == 0,
            "chunk_size must be a positive multiple of 8",
        )
        need(len(header) > 0, "header must not be empty")
        need(_is_int(total) and total >= len(header), f"total ({total}) must be an int >= len(header) ({len(header)})")
        nchunks = -(-total // chunk_size)
        need(len(chunk_sums) == nchunks, f"{len(chunk_sums)} chunk sums given for {nchunks} chunks")
        need(callable(digest) or _is_digest(digest), "digest must be a str of <= 256 chars or a callable")
        need(stall_timeout > 0, "stall_timeout must be positive")
        need(
            not inline or (total <= chunk_size and bool(digest) and not callable(digest)), "inline: one chunk, a digest"
        )
        self._sid = sid
        self._inline = inline
        # A lazy digest (a callable) is computed at END from the chunk sums, which may then be a lazy
        # sequence too: the first chunk leaves without a pass over the whole model (the offer names no digest).
        self._offer = Offer(
            sid, total, chunk_size, alg, "" if callable(digest) else digest, bytes(header), dict(route or {})
        )
        self._total, self._chunk, self._sums = total, chunk_size, chunk_sums
        self._digest_of = digest if callable(digest) else None
        self._digest = "" if callable(digest) else digest
        self._stall = float(stall_timeout)
        self._probe = self._stall / (self.MAX_RETRIES + 1)
        self._state = _S.OFFERED
        self._failure: str | None = None
        self._credit = 0  # max credit seen (lowered only by a nack)
        self._next = 0  # next offset to send in this pass
        self._high = total if resumed or inline else 0  # highest byte offset ever sent (by us or a predecessor)
        self._nacks: dict[int, int] = {}
        self._since = now  # last sign of life from the peer, or our last chunk
        self._now = now
        self._end_at = now  # when END was last sent
        self._outbox: list[Message] = []

    # --- properties ----------------------------------------------------------------------------------------

    @property
    def sid(self) -> int:
        return self._sid

    @property
    def state(self) -> SenderState:
        return self._state

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def sent_until(self) -> int:
        """End of the bytes sent in the current pass (drops back on a resume or nack)."""
        return self._next

    @property
    def credit(self) -> int:
        return self._credit

    @property
    def inline(self) -> bool:
        """The offer carries the whole stream (the driver attaches bytes [0, total) to it)."""
        return self._inline

    # --- API -----------------------------------------------------------------------------------------------

    def offer(self) -> Offer:
        return self._offer

    def chunk_length(self, off: int) -> int:
        if not (_is_int(off) and 0 <= off < self._total and off % self._chunk == 0):
            raise LocalProtocolError(f"stream {self._sid}: {off!r} is not a chunk offset")
        return min(self._chunk, self._total - off)

    def receive(self, msg: Message, now: float) -> None:
        _sid_of(msg, self._sid)
        self._now = now
        if self._state in (_S.DONE, _S.FAILED):
            return
        if isinstance(msg, Credit):
            self._on_credit(msg)
        elif isinstance(msg, Resume):
            self._check_rewind(msg.off, "resume")
            self._rewind(msg.off)
        elif isinstance(msg, Nack):
            self._on_nack(msg)
        elif isinstance(msg, Ack):
            self._on_ack(msg)
        elif isinstance(msg, Abort):
            self._fail("peer aborted: " + msg.reason, notify=False)
        else:
            raise RemoteProtocolError(f"stream {self._sid}: unexpected {msg.TYPE!r} message at the sender")
        self._since = now

    def next_messages(self, now: float) -> list[Message]:
        self._now = now
        out, self._outbox = self._outbox, []
        if self._state in (_S.DONE, _S.FAILED):
            return out
        if self._waiting() and now >= self._since + self._stall:  # the same sum as deadline(): no rounding gap
            what = "ack" if self._state is _S.ENDED else "credit"
            self._fail(f"stalled: no {what} for {self._stall} s", notify=True)
            return out + self._take()
        while self._next < self._total:
            end = self._next + self.chunk_length(self._next)
            if end > self._credit:
                break
            chunk_sum = self._sums[self._next // self._chunk]
            if not _is_int(chunk_sum):
                raise LocalProtocolError(f"stream {self._sid}: chunk sum at {self._next} must be an int")
            out.append(Chunk(self._sid, self._next, chunk_sum))
            self._next, self._high, self._since = end, max(self._high, end), now
        if self._state is _S.SENDING and self._next == self._total:
            self._state = _fire(_SENDER, self._state, "sent_all", self._sid)
            out.append(End(self._sid, self._stream_digest()))
            self._end_at = now
        elif self._state is _S.ENDED and now >= self._end_at + self._probe:
            out.append(End(self._sid, self._stream_digest()))  # the ACK may have been lost: ask again
            self._end_at = now
        return out

    def deadline(self) -> float | None:
        if self._outbox:
            return self._now
        if self._state in (_S.DONE, _S.FAILED):
            return None
        if not self._waiting():
            return self._now
        stall = self._since + self._stall
        return min(stall, self._end_at + self._probe) if self._state is _S.ENDED else stall

    def abort(self, reason: str) -> list[Message]:
        """Give the stream up on this side (shutdown, a RemoteProtocolError): the Abort to send, if any."""
        if self._state in (_S.DONE, _S.FAILED):
            return []
        self._fail(reason, notify=True)
        return self._take()

    # --- internals -----------------------------------------------------------------------------------------

    def _waiting(self) -> bool:
        if self._state is _S.SENDING:
            return self._next < self._total and self._next + self.chunk_length(self._next) > self._credit
        return self._state in (_S.OFFERED, _S.ENDED)

    def _on_credit(self, msg: Credit) -> None:
        until = msg.until
        if not 0 <= until <= self._total:
            raise RemoteProtocolError(f"stream {self._sid}: credit until {until} is outside [0, {self._total}]")
        if until % self._chunk and until != self._total:
            raise RemoteProtocolError(f"stream {self._sid}: credit until {until} is not a chunk boundary")
        self._state = _fire(_SENDER, self._state, "credit", self._sid)
        self._credit = max(self._credit, until)

    def _check_rewind(self, off: int, kind: str) -> None:
        if not 0 <= off <= self._total or (off % self._chunk and off != self._total):
            raise RemoteProtocolError(f"stream {self._sid}: {kind} offset {off} is not a chunk boundary of the stream")
        if off > self._high:
            raise RemoteProtocolError(f"stream {self._sid}: {kind} offset {off} is beyond the {self._high} bytes sent")

    def _rewind(self, off: int) -> None:
        self._state = _fire(_SENDER, self._state, "rewind", self._sid)
        self._next = off

    def _on_nack(self, msg: Nack) -> None:
        self._check_rewind(msg.off, "nack")
        target = 0 if msg.off == self._total else msg.off  # nack at the end: the whole stream again
        count = self._nacks[target] = self._nacks.get(target, 0) + 1
        if count > self.MAX_RETRIES:
            self._fail(f"gave up after {count} nacks at offset {target}: {msg.reason}", notify=True)
            return
        self._credit = min(self._credit, target)  # the receiver restates its credit right after the nack
        self._rewind(target)

    def _on_ack(self, msg: Ack) -> None:
        if self._state is _S.OFFERED and not self._inline:
            raise RemoteProtocolError(f"stream {self._sid}: 'ack' is not allowed in state offered")
        nxt = _fire(_SENDER, self._state, "ack", self._sid)
        if msg.digest != self._stream_digest():
            raise RemoteProtocolError(f"stream {self._sid}: ack digest {msg.digest!r} is not the stream's digest")
        if self._high < self._total:
            raise RemoteProtocolError(f"stream {self._sid}: ack before every byte was sent ({self._high})")
        self._state = nxt

    def _stream_digest(self) -> str:
        if self._digest_of is not None and not self._digest:
            digest = self._digest_of()
            if not _is_digest(digest):
                raise LocalProtocolError(f"stream {self._sid}: the digest callable must return a str of <= 256 chars")
            self._digest = digest
        return self._digest

    def _fail(self, reason: str, *, notify: bool) -> None:
        self._state = _fire(_SENDER, self._state, "fail", self._sid)
        self._failure = reason
        if notify:
            self._outbox.append(Abort(self._sid, reason))

    def _take(self) -> list[Message]:
        out, self._outbox = self._outbox, []
        return out


class Receiver:
    """The receiving half of a stream: validates the offer, grants credit, verifies chunks and the digest."""

    def __init__(
        self,
        offer: Offer,
        *,
        window: int,
        now: float,
        digest_fn: DigestFn,
        max_total: int,
        algorithms: Collection[str] = ("sum64", "crc32"),
        min_chunk: int = 4096,
        max_chunk: int = 64 << 20,
        stall_timeout: float = 30.0,
        max_retries: int = 5,
    ) -> None:
        if not isinstance(offer, Offer):
            raise LocalProtocolError(f"a Receiver starts from an Offer, not {type(offer).__name__}")
        sid, total, chunk = offer.sid, offer.total, offer.chunk

        def need(ok: bool, what: str) -> None:
            if not ok:
                raise RemoteProtocolError(f"offer {sid}: {what}")

        need(total <= max_total, f"total {total} exceeds the {max_total}-byte limit")
        need(len(offer.header) > 0, "empty header")
        need(total >= len(offer.header), f"total {total} is shorter than the {len(offer.header)}-byte header")
        need(min_chunk <= chunk <= max_chunk, f"chunk {chunk} is outside [{min_chunk}, {max_chunk}]")
        need(chunk % 8 == 0, f"chunk {chunk} is not a multiple of 8")
        need(offer.alg in algorithms, f"unknown digest algorithm {offer.alg!r}")
        need(isinstance(offer.digest, str) and len(offer.digest) <= MAX_DIGEST_LEN, "digest longer than 256 chars")
        if not _is_int(window) or stall_timeout <= 0 or not _is_int(max_retries) or max_retries < 0:
            raise LocalProtocolError("window must be an int, stall_timeout positive, max_retries an int >= 0")
        self._offer, self._sid, self._total, self._chunk = offer, sid, total, chunk
        self._window = max(1, -(-window // chunk)) * chunk
        self._digest_fn = digest_fn
        self._stall = float(stall_timeout)
        self._max_retries = max_retries
        self._probe = self._stall / (max_retries + 1)
        self._state = _R.RECEIVING
        self._failure: str | None = None
        self._expected = 0  # next byte expected = bytes verified, contiguous
        self._arrived = 0  # end of the chunks accepted: [expected, arrived) is being written by the driver
        self._held_end: End | None = None  # an END that came while accepted chunks were still being written
        self._accepted_end = 0  # the furthest end of any chunk ever accepted (to catch driver misuse)
        self._triples: list[tuple[int, int, int]] = []
        self._grant = 0  # credit granted in this pass
        self._granted = 0  # highest credit ever granted: no correct sender exceeds it
        self._retries: dict[int, int] = {}  # chunk offset -> digest mismatches
        self._restarts = 0  # whole-stream digest mismatches
        self._rewind_at: int | None = None  # a resume/nack for this offset is outstanding
        self._since, self._probes, self._now = now, 0, now
        self._started = False
        self._acked = ""  # the digest acknowledged once DONE
        self._outbox: list[Message] = []

    # --- properties ----------------------------------------------------------------------------------------

    @property
    def state(self) -> ReceiverState:
        return self._state

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def offset(self) -> int:
        return self._expected

    @property
    def arrived(self) -> int:
        """The end of the chunks accepted so far, contiguous from 0: the offset of the next chunk to accept."""
        return self._arrived

    @property
    def total(self) -> int:
        return self._total

    @property
    def chunk_size(self) -> int:
        return self._chunk

    @property
    def offer(self) -> Offer:
        return self._offer

    @property
    def window(self) -> int:
        """The window in bytes, rounded up to whole chunks."""
        return self._window

    @property
    def credit(self) -> int:
        return self._grant

    # --- API -----------------------------------------------------------------------------------------------

    @classmethod
    def restore(cls, offer: Offer, verified: Sequence[tuple[int, int, int]], **kwargs: Any) -> Receiver:
        """A receiver that already holds the verified chunks ``verified`` (from a journal, after a restart).

        The triples must be the stream's first chunks, contiguous from offset 0; the driver then calls
        ``resume(now)`` so the sender continues from there instead of from zero.
        """
        rx = cls(offer, **kwargs)
        expected = 0
        for off, length, _ in verified:
            if off != expected or length != rx.chunk_length(off):
                raise LocalProtocolError(f"stream {offer.sid}: journal is not contiguous at offset {off}")
            expected += length
        rx._triples = [tuple(t) for t in verified]  # type: ignore[misc]
        rx._expected = rx._arrived = rx._accepted_end = expected
        rx._started = True
        return rx

    @property
    def verified(self) -> list[tuple[int, int, int]]:
        """(offset, length, sum) of every verified chunk so far: what a journal needs to resume."""
        return list(self._triples)

    def chunk_length(self, off: int) -> int:
        return min(self._chunk, self._total - off)

    def accept_inline(self, length: int) -> bool:
        """The offer carried ``length`` bytes: should the driver write them (then call ``inline_written``)?

        Yes when they are the whole stream and within one chunk (the window, whole chunks, always holds it),
        and the offer names the digest to check them against. No: the driver calls ``start()`` as usual.
        """
        if self._started:
            raise LocalProtocolError(f"stream {self._sid}: accept_inline() after start()")
        return self._state is _R.RECEIVING and length == self._total <= self._chunk and bool(self._offer.digest)

    def inline_written(self, actual_sum: int, now: float) -> list[Message]:
        """The offer's bytes are in place with sum ``actual_sum``: ACK when they match the offer's digest.

        On a mismatch nothing is sent and the stream is not started: the driver calls ``start()``, whose
        credit makes the sender send the chunk the ordinary way.
        """
        if self._started:
            raise LocalProtocolError(f"stream {self._sid}: inline_written() after start()")
        self._now = now
        triples = [(0, self._total, actual_sum)]
        digest = self._digest_fn(triples)
        if digest != self._offer.digest:
            return []
        self._started = True
        self._triples, self._expected, self._since = triples, self._total, now
        self._state = _fire(_RECEIVER, self._state, "verified", self._sid)
        self._acked = digest
        return [Ack(self._sid, digest)]

    def start(self) -> list[Message]:
        if self._started:
            raise LocalProtocolError(f"stream {self._sid}: start() called twice")
        self._started = True
        return [self._credit_msg()]

    def accept_chunk(self, msg: Chunk, length: int) -> bool:
        if not isinstance(msg, Chunk):
            raise LocalProtocolError(f"accept_chunk takes a Chunk, not {type(msg).__name__}")
        _sid_of(msg, self._sid)
        if self._state is not _R.RECEIVING:
            return False
        off = msg.off
        self._check_chunk(off, length)
        if off > self._arrived:  # something before it was lost: ask once per gap
            self._ask_resume()
        if off != self._arrived:
            return False
        self._arrived += length
        self._accepted_end = max(self._accepted_end, self._arrived)
        return True

    def ahead(self, msg: Chunk, length: int) -> bool:
        """Whether a chunk lies beyond the next one expected: it overtook an earlier chunk sent on another
        connection (a sender may spread chunks over several, ``fedbus.transport.endpoint.stream_lanes``), and
        the driver holds it until ``arrived`` reaches it. At most a window of chunks can be ahead, so what the
        driver holds is bounded by the credit. Raises RemoteProtocolError for a chunk no correct sender sends."""
        if not isinstance(msg, Chunk):
            raise LocalProtocolError(f"ahead takes a Chunk, not {type(msg).__name__}")
        _sid_of(msg, self._sid)
        if self._state is not _R.RECEIVING:
            return False
        self._check_chunk(msg.off, length)
        return msg.off > self._arrived

    def _check_chunk(self, off: int, length: int) -> None:
        if not 0 <= off < self._total or off % self._chunk:
            raise RemoteProtocolError(f"stream {self._sid}: chunk offset {off} is not a chunk boundary of the stream")
        want = self.chunk_length(off)
        if length != want:
            raise RemoteProtocolError(f"stream {self._sid}: chunk at offset {off} has {length} bytes, not {want}")
        if off + length > self._granted:
            raise RemoteProtocolError(f"stream {self._sid}: chunk at offset {off} exceeds the credit {self._granted}")

    def chunk_written(self, msg: Chunk, actual_sum: int, now: float) -> bool:
        """An accepted chunk is in place and its bytes sum to ``actual_sum``: True if that verified it.

        Call it in the order the chunks were accepted. A chunk accepted before the stream rewound below
        it (a NACK, a resume) is ignored (False): it will be sent again."""
        _sid_of(msg, self._sid)
        self._now = now
        if self._state is not _R.RECEIVING:
            return False
        off = msg.off
        if off < self._expected or off >= self._accepted_end:
            raise LocalProtocolError(
                f"stream {self._sid}: chunk_written({off}) but offset {self._expected} is next"
                f" and chunks were accepted up to {self._accepted_end}"
            )
        if off > self._expected:  # overtaken by a rewind
            return False
        if actual_sum != msg.sum:
            count = self._retries[off] = self._retries.get(off, 0) + 1
            if count > self._max_retries:
                self._fail(f"chunk digest mismatch at offset {off}, {count} times", notify=True)
            else:
                self._rewind_at, self._arrived, self._held_end = off, off, None
                self._push(Nack(self._sid, off, f"chunk digest mismatch at offset {off}"))
                self._push(self._credit_msg())
            return False
        length = self.chunk_length(off)
        self._triples.append((off, length, msg.sum))
        self._expected += length
        self._arrived = max(self._arrived, self._expected)
        self._since, self._probes, self._rewind_at = now, 0, None
        grant = min(self._total, self._expected + self._window)
        if grant - self._grant >= self._chunk or grant == self._total > self._grant:  # a whole chunk is free again
            self._push(self._credit_msg())
        if self._expected == self._total and self._held_end is not None:
            end, self._held_end = self._held_end, None
            self._on_end(end, now)
        return True

    def receive(self, msg: Message, now: float) -> None:
        _sid_of(msg, self._sid)
        self._now = now
        if isinstance(msg, Chunk):
            raise LocalProtocolError(f"stream {self._sid}: chunks go through accept_chunk/chunk_written")
        if self._state is _R.FAILED:
            return
        if isinstance(msg, End):
            self._on_end(msg, now)
        elif isinstance(msg, Abort):
            if self._state is _R.RECEIVING:
                self._fail("peer aborted: " + msg.reason, notify=False)
        elif isinstance(msg, Offer) and msg == self._offer:  # re-offered (the credit was lost): say where we are
            if self._state is _R.RECEIVING:
                probe = self.resume(now)  # (resume() replaces the outbox: extend after it)
                self._outbox.extend(probe)
        elif self._state is _R.RECEIVING:
            raise RemoteProtocolError(f"stream {self._sid}: unexpected {msg.TYPE!r} message at the receiver")

    def next_messages(self, now: float) -> list[Message]:
        self._now = now
        if self._state is _R.RECEIVING and now >= self._due():
            if self._probes < self._max_retries:  # probe: repairs a lost credit, chunk or end
                self._probes += 1
                self._rewind_at = self._expected
                self._push(Resume(self._sid, self._expected))
                self._push(self._credit_msg())
            else:
                self._fail(f"stalled: no data for {self._stall} s", notify=True)
        out, self._outbox = self._outbox, []
        return out

    def resume(self, now: float) -> list[Message]:
        """After the driver reconnected: continue from the verified offset (what was in flight is lost)."""
        self._now = now
        if self._state is _R.DONE:
            return [Ack(self._sid, self._acked)]
        if self._state is _R.FAILED:
            return [Abort(self._sid, self._failure or "failed")]
        self._outbox = [m for m in self._outbox if not isinstance(m, Resume | Credit)]
        self._since, self._probes, self._rewind_at = now, 0, self._expected
        self._arrived, self._held_end = self._expected, None
        return [Resume(self._sid, self._expected), self._credit_msg()]

    def deadline(self) -> float | None:
        if self._outbox:
            return self._now
        return self._due() if self._state is _R.RECEIVING else None

    def abort(self, reason: str) -> list[Message]:
        """Give the stream up on this side (shutdown, a RemoteProtocolError): the Abort to send, if any."""
        if self._state is not _R.RECEIVING:
            return []
        self._fail(reason, notify=False)
        return [Abort(self._sid, reason)]

    # --- internals -----------------------------------------------------------------------------------------

    def _due(self) -> float:
        return self._since + (self._probes + 1) * self._probe

    def _credit_msg(self) -> Credit:
        self._grant = min(self._total, self._expected + self._window)
        self._granted = max(self._granted, self._grant)
        return Credit(self._sid, self._grant)

    def _push(self, msg: Message) -> None:
        """Queue ``msg``, keeping only the newest credit and one copy of anything else."""
        if isinstance(msg, Credit):
            self._outbox = [m for m in self._outbox if not isinstance(m, Credit)]
        elif msg in self._outbox:
            return
        self._outbox.append(msg)

    def _ask_resume(self) -> None:
        """Ask the sender to continue after the chunks accepted so far (once per gap)."""
        if self._rewind_at != self._arrived:
            self._rewind_at = self._arrived
            self._push(Resume(self._sid, self._arrived))

    def _on_end(self, msg: End, now: float) -> None:
        if self._state is _R.DONE:
            self._push(Ack(self._sid, self._acked))  # the first ack may have been lost
            return
        if self._expected < self._total:
            if self._arrived == self._total:  # every byte is here, some still being written: answer then
                self._held_end = msg
            else:  # bytes missing (lost or still in flight)
                self._ask_resume()
            return
        digest = self._digest_fn(self._triples)
        if digest == msg.digest and (not self._offer.digest or digest == self._offer.digest):
            self._state = _fire(_RECEIVER, self._state, "verified", self._sid)
            self._acked = digest
            self._push(Ack(self._sid, digest))
            return
        self._restarts += 1
        if self._restarts > self._max_retries:
            self._fail(f"stream digest mismatch, {self._restarts} times", notify=True)
            return
        self._expected, self._arrived, self._triples, self._grant = 0, 0, [], 0  # everything again
        self._since, self._probes, self._rewind_at = now, 0, 0
        self._push(Nack(self._sid, 0, "stream digest mismatch"))
        self._push(self._credit_msg())

    def _fail(self, reason: str, *, notify: bool) -> None:
        self._state = _fire(_RECEIVER, self._state, "fail", self._sid)
        self._failure = reason
        if notify:
            self._push(Abort(self._sid, reason))
