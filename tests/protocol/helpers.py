"""A Sender and a Receiver joined by a fake in-memory link: no sockets, no event loop, a virtual clock.

The link carries (message, payload) pairs; every message also goes through the envelope codec, so what the
machines emit is what the wire can carry. Faults are drawn from ``random.Random(seed)``: drop, duplicate,
reorder (swap with the next message), corrupt one payload bit, and reconnect (everything in flight is lost,
then the receiver resumes). Time only moves when the link is idle: it jumps to the earliest deadline.
"""

from __future__ import annotations

import hashlib
import random
import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from fedbus.protocol import Chunk, Message, Receiver, Sender, decode, encode

Packet = tuple[Message, bytes | None]


def chunk_sum(payload: bytes | bytearray) -> int:
    """The test chunk digest: crc32 catches every single-bit corruption."""
    return zlib.crc32(payload)


def digest_fn(triples: Iterable[tuple[int, int, int]]) -> str:
    return hashlib.blake2b(repr(list(triples)).encode(), digest_size=16).hexdigest()


def roundtrip(msg: Message) -> Message:
    decoded, _ = decode(encode(msg))
    assert decoded == msg
    return decoded


def make_sender(
    data: bytes,
    *,
    chunk: int,
    sid: int = 1,
    header_len: int = 8,
    now: float = 0.0,
    stall_timeout: float = 30.0,
    digest: str | None = None,
    lazy: bool = False,
) -> Sender:
    """A sender of ``data``; ``lazy`` gives it chunk sums computed on first use and a digest computed at END."""
    offs = range(0, len(data), chunk)
    sums: Sequence[int] = [chunk_sum(data[o : o + chunk]) for o in offs]
    lazy_digest = None
    if lazy:
        sums = LazySums(data, chunk)
        lazy_digest = sums.digest
    elif digest is None:
        digest = digest_fn((o, len(data[o : o + chunk]), s) for o, s in zip(offs, sums, strict=True))
    return Sender(
        sid,
        header=data[: min(header_len, len(data))],
        total=len(data),
        chunk_size=chunk,
        chunk_sums=sums,
        digest=lazy_digest or digest,  # type: ignore[arg-type]
        alg="crc32",
        now=now,
        stall_timeout=stall_timeout,
    )


class LazySums(Sequence[int]):
    """Chunk sums computed when first asked for, counting the computations (each chunk once at most)."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.chunk = data, chunk
        self.computed: dict[int, int] = {}
        self.digests = 0

    def __len__(self) -> int:
        return -(-len(self.data) // self.chunk)

    def __getitem__(self, k):  # type: ignore[override]
        if k not in self.computed:
            self.computed[k] = chunk_sum(self.data[k * self.chunk : (k + 1) * self.chunk])
        return self.computed[k]

    def digest(self) -> str:
        self.digests += 1
        c = self.chunk
        return digest_fn((k * c, len(self.data[k * c : (k + 1) * c]), self[k]) for k in range(len(self)))


@dataclass(frozen=True)
class Faults:
    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    corrupt: float = 0.0  # per chunk sent
    reconnect: float = 0.0  # per delivery
    corrupt_once: frozenset[int] = frozenset()  # chunk offsets corrupted the first time they are sent


@dataclass
class StreamPair:
    data: bytes
    chunk: int = 64
    window: int = 256
    faults: Faults = field(default_factory=Faults)
    seed: int = 0
    stall_timeout: float = 30.0
    max_retries: int = 5
    sender_digest: str | None = None
    check_window: bool = True
    lazy: bool = False
    pipeline: int = 0
    """Up to this many accepted chunks are written later, in order, as a driver with placement threads does
    (0: each chunk is written as it is accepted)."""

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.now = 0.0
        self.sender = make_sender(
            self.data, chunk=self.chunk, stall_timeout=self.stall_timeout, digest=self.sender_digest, lazy=self.lazy
        )
        self.receiver = Receiver(
            roundtrip(self.sender.offer()),  # type: ignore[arg-type]
            window=self.window,
            now=self.now,
            digest_fn=digest_fn,
            max_total=1 << 30,
            min_chunk=8,
            stall_timeout=self.stall_timeout,
            max_retries=self.max_retries,
        )
        self.buffer = bytearray(len(self.data))
        self.to_receiver: deque[Packet] = deque()
        self.to_sender: deque[Packet] = deque()
        self.sent: list[tuple[float, Message]] = []  # everything either side emitted, before faults
        self.bytes_sent = 0
        self.steps = 0
        self._corrupted: set[int] = set()
        self._idle = 0
        self.placing: deque[tuple[Chunk, bytes]] = deque()  # accepted, not yet written
        self.placed_end = 0  # end of the furthest chunk handed to placement
        self._emit(self.receiver.start(), self.to_sender)

    # --- the link ------------------------------------------------------------------------------------------

    def _emit(self, msgs: list[Message], queue: deque[Packet]) -> None:
        f = self.faults
        for msg in msgs:
            msg = roundtrip(msg)
            self.sent.append((self.now, msg))
            payload = None
            if isinstance(msg, Chunk):
                payload = self.data[msg.off : msg.off + self.sender.chunk_length(msg.off)]
                self.bytes_sent += len(payload)
                if msg.off in f.corrupt_once and msg.off not in self._corrupted:
                    self._corrupted.add(msg.off)
                    payload = self._flip(payload)
            if self.rng.random() < f.drop:
                continue
            for _ in range(2 if self.rng.random() < f.duplicate else 1):
                p = payload
                if p is not None and self.rng.random() < f.corrupt:
                    p = self._flip(p)
                queue.append((msg, p))

    def _flip(self, payload: bytes) -> bytes:
        b = bytearray(payload)
        b[self.rng.randrange(len(b))] ^= 1 << self.rng.randrange(8)
        return bytes(b)

    def reconnect(self) -> None:
        """The connection broke: whatever was in flight is gone; the receiver asks to continue."""
        self.to_receiver.clear()
        self.to_sender.clear()
        self._emit(self.receiver.resume(self.now), self.to_sender)

    def _deliver(self, queue: deque[Packet]) -> None:
        if len(queue) > 1 and self.rng.random() < self.faults.reorder:
            queue[0], queue[1] = queue[1], queue[0]
        msg, payload = queue.popleft()
        if queue is self.to_sender:
            self.sender.receive(msg, self.now)
        elif isinstance(msg, Chunk):
            assert payload is not None
            if self.placing and msg.off < self.placed_end:  # a chunk sent again: earlier writes land first
                self.settle(len(self.placing))
            if self.receiver.accept_chunk(msg, len(payload)):
                self.placing.append((msg, payload))
                self.placed_end = max(self.placed_end, msg.off + len(payload))
                self.settle(len(self.placing) - self.pipeline)
        else:
            self.receiver.receive(msg, self.now)

    def settle(self, count: int) -> None:
        """Write the oldest ``count`` accepted chunks and tell the receiver, in the order they were accepted."""
        for _ in range(max(0, count)):
            msg, payload = self.placing.popleft()
            self.buffer[msg.off : msg.off + len(payload)] = payload
            self.receiver.chunk_written(msg, chunk_sum(self.buffer[msg.off : msg.off + len(payload)]), self.now)

    # --- driving -------------------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        terminal = ("done", "failed")
        return self.sender.state.value in terminal and self.receiver.state.value in terminal

    def check_invariants(self) -> None:
        s, r = self.sender, self.receiver
        if self.check_window:
            assert s.sent_until - r.offset <= r.window, (s.sent_until, r.offset, r.window)
        assert 0 <= r.offset <= r.total and 0 <= s.credit <= r.total
        if r.state.value == "done":
            assert self.buffer == self.data, "receiver DONE with wrong bytes"
        if s.state.value == "done":
            assert r.state.value == "done", "sender DONE without a DONE receiver"

    def step(self) -> bool:
        """One delivery, or a jump of the clock to the next deadline; False once there is nothing left."""
        self.steps += 1
        self.check_invariants()
        self._emit(self.sender.next_messages(self.now), self.to_receiver)
        self._emit(self.receiver.next_messages(self.now), self.to_sender)
        self.check_invariants()
        if self.placing and (self.rng.random() < 0.3 or not (self.to_receiver or self.to_sender)):
            self.settle(self.rng.randint(1, len(self.placing)))
            return True
        if self.to_receiver or self.to_sender:
            if self.rng.random() < self.faults.reconnect:
                self.reconnect()
                return True
            if not self.to_sender or (self.to_receiver and self.rng.random() < 0.5):
                self._deliver(self.to_receiver)
            else:
                self._deliver(self.to_sender)
            return True
        deadlines = [d for d in (self.sender.deadline(), self.receiver.deadline()) if d is not None]
        if self.finished or not deadlines:
            return False
        nxt = min(deadlines)
        if nxt <= self.now:  # due now: the next_messages calls above must have acted on it
            self._idle += 1
            assert self._idle < 3, f"deadline {nxt} <= now {self.now} but no machine has anything to do"
        else:
            self._idle = 0
            self.now = nxt
        return True

    def run(self, max_steps: int = 200_000) -> StreamPair:
        for _ in range(max_steps):
            if not self.step():
                return self
        raise AssertionError(f"no end after {max_steps} steps: {self.sender.state}, {self.receiver.state}")

    def sent_of(self, kind: type[Message]) -> list[Message]:
        return [m for _, m in self.sent if isinstance(m, kind)]
