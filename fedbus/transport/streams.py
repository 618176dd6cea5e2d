"""The pump: drives protocol stream state machines over an endpoint.

Theory of operation. Every outgoing stream runs in its own task: it asks its ``Sender`` for messages,
sends them (chunks with their payload frames, straight from tensor memory), then sleeps until a control
message (credit, ack, nack, resume, abort) arrives or the sender's deadline passes. Every incoming stream
has a task too: chunks are checked by the ``Receiver`` before their bytes are touched, copied once into
the sink's preallocated buffer, digested there, and confirmed. All protocol decisions live in
``fedbus.protocol.stream``; this module only moves bytes and waits, so it stays a few dozen lines per side.

Bytes in flight per stream never exceed the receiver's credit window, so a 10 GiB model costs the
sender nothing beyond the model itself and the receiver one buffer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import mmap
import os
import secrets
import struct
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch

from fedbus import digest, serde
from fedbus._cores import thread_count, usable_cores
from fedbus._memory import populate_for_write, release_free_memory
from fedbus.errors import FedbusError, LocalProtocolError, PeerUnreachable, RemoteProtocolError, TransportError
from fedbus.log import get_logger
from fedbus.protocol.envelope import decode, encode
from fedbus.protocol.messages import Abort, Ack, Chunk, End, Message, Offer
from fedbus.protocol.stream import Receiver, ReceiverState, Sender, SenderState
from fedbus.transport.endpoint import COPY_BELOW
from fedbus.transport.finite import FiniteScan

DEFAULT_CHUNK = 2 << 20
"""Chunk size. A chunk is credited back once written, and a smaller one is written sooner; below 2 MiB the
per-message costs win. Chosen by a sweep of chunk x window sizes (docs/benchmarks.md, "Why the defaults")."""

DEFAULT_WINDOW = 64 << 20
"""Credit window in bytes: what one stream may have in flight beyond what the receiver verified. With 2 MiB
chunks, 64 MiB gave the best and steadiest cold transfer in the same sweep (docs/benchmarks.md)."""

TRIM_AFTER = 64 << 20
"""Bytes received by streams between two trims of the heap: when the last stream of a burst ends, the memory of
its frames goes back (``_memory.release_free_memory``, a few ms); a broker that takes small updates by the
thousand does not trim after each."""

PLACEMENT_MIN = 1 << 20
"""Chunks smaller than this are written by the event loop itself: a thread hop would cost more than the copy."""

log = get_logger("transport.streams")

T = TypeVar("T")


def placement_threads() -> int:
    """How many threads write received chunks into place (0: the event loop writes them itself).

    Writing a chunk (the first touch of fresh buffer pages, the copy out of zmq's frame, the digest of what
    landed) is most of a receiver's work: one thread doing it is busy for the whole transfer (``receiver_cpu_s``
    of ``fedbus bench transfer`` shows it). With spare cores the writes run in parallel, the loop only routing.
    On two cores there is no spare core: threads would only add hand-offs. ``FEDBUS_PLACEMENT_THREADS``
    overrides the choice.
    """
    cores = usable_cores()
    return thread_count("FEDBUS_PLACEMENT_THREADS", 0 if cores < 4 else min(4, cores // 4))


_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _placement_pool() -> concurrent.futures.ThreadPoolExecutor | None:
    """The process's placement threads, shared by every hub and stream (created on first use)."""
    global _pool
    if _pool is None:
        n = placement_threads()
        if n == 0:
            return None
        _pool = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="fedbus-place")
    return _pool


def _now() -> float:
    return time.monotonic()


class ModelSource:
    """Bytes to stream: the safetensors layout of a state_dict, digested once however often it is sent.

    A broker broadcasting one global model to N sites pays for the chunk sums once.
    """

    def __init__(self, lay: serde.Layout) -> None:
        self.layout = lay
        self.path: str | None = None  # the file streamed, for a source made by from_file
        self._index = digest.PartIndex(lay.parts)  # built once: slicing a chunk is then O(log parts)
        self._sums: dict[tuple[int, str], ChunkSums] = {}
        self._whole: bytes | None = None

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], metadata: dict | None = None) -> ModelSource:
        return cls(serde.layout(state_dict, metadata))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, max_total: int = 1 << 44) -> ModelSource:
        """A ``.safetensors`` file streamed straight from a read-only memory map (the page cache)."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) if size else b""
        view = memoryview(mm)
        head_len = int.from_bytes(view[:8], "little") if size >= 8 else 0
        data_start, specs, metadata = serde.parse_header(
            view[: 8 + min(head_len, serde.MAX_HEADER_BYTES)], max_total=max_total, total=size
        )
        lay = serde.Layout(
            header=bytes(view[:data_start]), specs=tuple(specs), parts=[view], total=size, metadata=metadata
        )
        source = cls(lay)
        source.path = os.fspath(path)
        return source

    @property
    def total(self) -> int:
        return self.layout.total

    def sums(self, chunk_size: int, alg: str) -> ChunkSums:
        """The chunk sums for this chunking, computed as chunks are first sent and kept for later sends."""
        key = (chunk_size, alg)
        if key not in self._sums:
            self._sums[key] = ChunkSums(self, chunk_size, alg)
        return self._sums[key]

    def whole(self) -> bytes:
        """All of the stream's bytes in one piece, joined once per source: how a small model travels inside its
        offer. The receiver gets one frame it can keep as its buffer (``BufferSink._adopt``) instead of a
        frame per tensor to copy out, and a broker sending one global model to every site joins it once."""
        if self._whole is None:
            self._whole = b"".join(self.frames(0, self.total))
        return self._whole

    def frames(self, off: int, length: int) -> list[Any]:
        """Zero-copy slices of the tensors' memory covering [off, off + length): one chunk's frames."""
        return digest.chunk_parts(self._index, off, length)


class ChunkSums(Sequence[int]):
    """A model's chunk sums, each computed when its chunk is first sent, so sending starts at once.

    Computing all sums before the offer would be a serial pass over the model before its first byte leaves;
    lazily, each 4 MiB sum is taken just before its chunk leaves, while the
    bytes are hot in cache. A broker broadcasting one global model to N sites still pays for them once.
    """

    def __init__(self, source: ModelSource, chunk_size: int, alg: str) -> None:
        # A weak reference: the source holds its sums, and a cycle would keep every old global model alive
        # until a full garbage collection (the broker would hold one more model per round).
        self._ref, self._total = weakref.ref(source), source.total
        self._chunk, self._alg = chunk_size, alg
        self._sums: list[int | None] = [None] * -(-source.total // chunk_size)
        self._coming: dict[int, concurrent.futures.Future[int]] = {}  # sums being computed by placement threads
        self._digest: str | None = None

    def __len__(self) -> int:
        return len(self._sums)

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        got = self._sums[k]
        if got is None:
            coming = self._coming.pop(k % len(self), None)
            got = self._sums[k] = coming.result() if coming is not None else self._compute(k % len(self))
        return got

    def prefetch(self, start: int, end: int, pool: concurrent.futures.Executor) -> None:
        """Start computing the sums of the chunks in byte range [start, end) in ``pool``, so the sender's
        loop finds them ready instead of reading each chunk itself before it leaves."""
        for k in range(start // self._chunk, min(len(self), -(-end // self._chunk))):
            if self._sums[k] is None and k not in self._coming:
                self._coming[k] = pool.submit(self._compute, k)

    def _compute(self, k: int) -> int:
        source = self._ref()
        if source is None:
            raise LocalProtocolError("chunk sums asked of a model source that is gone")
        off = k * self._chunk
        return digest.chunk_sum(source.frames(off, min(self._chunk, self._total - off)), self._alg)

    def digest(self) -> str:
        """The whole-stream digest (every chunk's sum, computing those not yet sent), computed once: a broker
        names it in every task's offer and audit record, which at many sites would add up."""
        if self._digest is None:
            total, chunk = self._total, self._chunk
            self._digest = digest.stream_digest(
                ((k * chunk, min(chunk, total - k * chunk), self[k]) for k in range(len(self))), self._alg
            )
        return self._digest


class BufferSink:
    """Receives a stream into one preallocated buffer; the result is tensors that are views of it.

    ``expected`` (a reference state_dict or specs) makes the offer fail fast when names, shapes or
    dtypes differ from what the receiver will accept, before any byte of payload is taken.
    With ``path`` the buffer is a shared memory map of that file: the finished file is a valid
    ``.safetensors`` file (what a site hands its training script), and its pages live in the page cache.
    With ``journal`` too, every verified chunk is appended to ``path + ".journal"``, so a process killed
    mid-stream can ``reopen`` the file and ask the sender to resume from the last verified chunk.
    """

    def __init__(
        self,
        *,
        max_total: int,
        expected: Any = None,
        alg: str = digest.DEFAULT_ALG,
        path: str | None = None,
        journal: bool = False,
        buffer: torch.Tensor | None = None,
        scan_finite: bool = False,
    ) -> None:
        self.max_total = max_total
        self.scan_finite = scan_finite  # check floats for NaN/Inf as chunks land (transport/finite.py)
        self._scan: FiniteScan | None = None
        self._reuse = buffer  # a uint8 buffer from an earlier stream of the same size: no page faults
        self.path = path
        self.journal_path = f"{path}.journal" if path is not None and journal else None
        self._journal: Any = None
        self.expected = expected
        self.alg = alg
        self.buffer: torch.Tensor | None = None
        self._view: np.ndarray | None = None
        self._populate = False  # a fresh anonymous buffer: its pages are mapped a chunk at a time before writing
        self.specs: list[serde.TensorSpec] = []
        self.data_start = 0
        self.metadata: dict[str, str] = {}
        self.header = b""
        self.offer: Offer | None = None
        self.peer = b""
        self.result: asyncio.Future[dict[str, torch.Tensor]] = asyncio.get_running_loop().create_future()
        # An owner that must record what arrived before the sender may forget it (the broker: an update is
        # counted, or refused with a reason, before its site hears it was delivered) sets this future and
        # resolves it once recorded; the hub holds the ACK until then, so a crash never loses an acked stream.
        self.settled: asyncio.Future[None] | None = None

    def open(self, offer: Offer, *, resume: bool = False, inline: Sequence[memoryview] = ()) -> None:
        """Validate the untrusted header and allocate; raises RemoteProtocolError to refuse the stream.

        ``inline``: the stream's bytes, carried by its offer. One writable, 8-byte aligned frame holding all of
        them becomes the buffer itself (``_adopt``), where a copy would be the only thing the bytes need."""
        self.data_start, self.specs, self.metadata = serde.parse_header_cached(
            offer.header, max_total=self.max_total, total=offer.total
        )
        if self.data_start != len(offer.header):
            raise RemoteProtocolError("offer header must be exactly the stream's header bytes")
        if self.expected is not None:
            serde.check_compatible(self.expected, self.specs)
        self.header = offer.header
        self.offer = offer
        self.alg = offer.alg
        if self.scan_finite:
            self._scan = FiniteScan(self.specs, self.data_start)
        if not self._adopt(offer, inline):
            self._allocate(offer, resume)
        if self.journal_path is not None:
            self._journal = open(self.journal_path, "ab")  # noqa: SIM115 - lives as long as the stream
            if not resume:
                head = encode(offer)
                self._journal.write(struct.pack("<II", len(head), len(self.peer)) + head + self.peer)
                self._journal.flush()

    def record(self, off: int, length: int, chunk_sum: int) -> None:
        """Journal one verified chunk (after its bytes are in the mapped file)."""
        if self._journal is not None:
            self._journal.write(struct.pack("<QQQ", off, length, chunk_sum))
            self._journal.flush()

    @classmethod
    def reopen(
        cls, path: str, *, max_total: int, expected: Any = None
    ) -> tuple[BufferSink, list[tuple[int, int, int]]]:
        """Reopen a journaled stream left by a killed process: the sink and its verified chunks."""
        with open(f"{path}.journal", "rb") as f:
            data = f.read()
        try:
            head_len, peer_len = struct.unpack_from("<II", data)
            offer, _ = decode(data[8 : 8 + head_len])
            peer = data[8 + head_len : 8 + head_len + peer_len]
        except (struct.error, RemoteProtocolError) as exc:
            raise TransportError(f"journal of {path} is unreadable: {exc}") from exc
        if not isinstance(offer, Offer):
            raise TransportError(f"journal of {path} does not start with an offer")
        body = data[8 + head_len + peer_len :]
        body = body[: len(body) - len(body) % 24]  # a record torn by the kill is dropped
        triples = [struct.unpack_from("<QQQ", body, i) for i in range(0, len(body), 24)]
        sink = cls(max_total=max_total, expected=expected, path=path, journal=True)
        sink.peer = peer
        sink.open(offer, resume=True)
        return sink, triples

    def _adopt(self, offer: Offer, inline: Sequence[memoryview]) -> bool:
        """Take a small model's one inline frame (zmq's received message) as the buffer: no allocation, and
        ``write`` finds its bytes in place: a broker taking small updates from many sites allocates and fills
        no buffer per update. Tensors keep the frame alive.

        Only a frame under ``COPY_BELOW``: every sender copies those into memory of zmq's own. A larger one may
        have been sent zero-copy over ``inproc://`` (SimEnv), and its memory is then the sender's own object."""
        if self.path is not None or self._reuse is not None or len(inline) != 1:
            return False
        frame = inline[0]
        if frame.nbytes != offer.total or frame.nbytes >= COPY_BELOW or frame.readonly or not frame.c_contiguous:
            return False
        view = np.frombuffer(frame, dtype=np.uint8)
        if view.ctypes.data % 8:  # safetensors aligns tensors to 8 bytes within the file; keep them aligned here
            return False
        self.buffer, self._view = torch.from_numpy(view), view
        return True

    def _allocate(self, offer: Offer, resume: bool) -> None:
        reuse = self._reuse
        if self.path is None and reuse is not None and reuse.dtype == torch.uint8 and reuse.numel() == offer.total:
            self.buffer = reuse
        elif self.path is None:
            self.buffer = serde.allocate(offer.total, huge=placement_threads() > 0)
            # Only a buffer of its own mapping has fresh pages to populate; a small one comes from the heap
            # (a system call per chunk of a small upload would cost a broker at many sites for nothing).
            self._populate = offer.total >= PLACEMENT_MIN
        else:
            if not resume:  # no O_TRUNC: a recycled file's pages (fedbus.recycle) are overwritten, not freed
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                try:
                    os.ftruncate(fd, offer.total)
                finally:
                    os.close(fd)
            self.buffer = torch.from_file(self.path, shared=True, size=offer.total, dtype=torch.uint8)
        self._view = self.buffer.numpy()

    def write(self, off: int, frames: Sequence[memoryview]) -> int:
        """Copy one chunk's frames into place and return the digest of what landed."""
        view = self._view
        assert view is not None and self.buffer is not None
        if self._populate:
            self._populate = populate_for_write(self.buffer.data_ptr() + off, sum(f.nbytes for f in frames))
        pos = off
        for f in frames:
            n = f.nbytes
            src = np.frombuffer(f, dtype=np.uint8)
            if src.ctypes.data != view.ctypes.data + pos:  # an adopted frame is in place already
                view[pos : pos + n] = src
            pos += n
        if self._scan is not None:
            self._scan.scan(off, frames)
        return digest.chunk_sum([view[off:pos]], self.alg)

    def nonfinite(self, read: Callable[[int, int], bytes]) -> list[str] | None:
        """What the finite scan found (``FiniteScan.result``), or None without one."""
        if self._scan is None or self.offer is None:
            return None
        return self._scan.result(self.offer.total, read)

    def finish(self) -> Received:
        """The received tensors, as views of the buffer; the stream's own header bytes must match the offer."""
        assert self._view is not None and self.buffer is not None
        if self._view[: len(self.header)].tobytes() != self.header:
            raise RemoteProtocolError("stream header bytes differ from the offered header")
        self.close()
        if self.journal_path is not None:
            os.unlink(self.journal_path)
        received = Received(serde.tensors_from_buffer(self.buffer, self.specs, self.data_start))
        received.raw = self.buffer
        view = self._view
        received.nonfinite = self.nonfinite(lambda at, n: view[at : at + n].tobytes())
        return received

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None


class Received(dict[str, torch.Tensor]):
    """A received model: its tensors, views of one buffer, and ``raw``, that buffer: the exact bytes of the
    stream, a valid safetensors file (kept as they are, they need no laying out again). ``nonfinite``: the
    tensors the sink's finite scan found a NaN or Inf in ([]: none; None: not scanned)."""

    raw: torch.Tensor
    nonfinite: list[str] | None = None


class _Placements:
    """The chunks of one incoming stream on their way into its sink, written by placement threads.

    They are reported to the ``Receiver`` in the order it accepted them. A chunk sent again (after a NACK or a
    resume) waits until every write before it has landed and been reported, so two writes never race for the
    same bytes and a chunk already verified is never overwritten. A chunk that overtook an earlier one (the
    sender spreads chunks over several connections) waits in ``ahead`` for its turn, and so does an END that
    came before the chunks it follows: both are bounded by the credit window.
    """

    def __init__(
        self,
        receiver: Receiver,
        sink: BufferSink,
        pool: concurrent.futures.Executor | None,
        wake: Callable[[], None],
    ) -> None:
        self.receiver, self.sink, self.pool, self.wake = receiver, sink, pool, wake
        self.pending: deque[tuple[Chunk, int, concurrent.futures.Future[int]]] = deque()
        self.end = 0  # the furthest end of a chunk handed to a thread
        self.ahead: dict[int, tuple[Chunk, list[memoryview], int]] = {}  # offset -> a chunk that came early
        self.end_msg: End | None = None  # an END that came while chunks were ahead of a missing one

    async def feed(self, msg: Message, frames: list[memoryview]) -> None:
        receiver = self.receiver
        if not isinstance(msg, Chunk):
            if isinstance(msg, End) and self.ahead:
                self.end_msg = msg
            else:
                receiver.receive(msg, _now())
            return
        length = sum(f.nbytes for f in frames)
        if receiver.ahead(msg, length):
            self.ahead[msg.off] = (msg, frames, length)
            return
        await self._place(msg, frames, length)
        if self.ahead:
            while (early := self.ahead.pop(receiver.arrived, None)) is not None:
                await self._place(*early)
            for off in [off for off in self.ahead if off < receiver.arrived]:  # sent again after a rewind and
                del self.ahead[off]  # taken in its turn: the early copy is stale
            if not self.ahead and self.end_msg is not None:
                end, self.end_msg = self.end_msg, None
                receiver.receive(end, _now())

    async def _place(self, msg: Chunk, frames: list[memoryview], length: int) -> None:
        if self.pending and msg.off < self.end:
            await self.drain()
        if not self.receiver.accept_chunk(msg, length):
            return
        if self.pool is None or length < PLACEMENT_MIN:
            await self.drain()
            self._written(msg, length, self.sink.write(msg.off, frames))
            return
        future = self.pool.submit(self.sink.write, msg.off, frames)
        future.add_done_callback(lambda _: self.wake())
        self.pending.append((msg, length, future))
        self.end = max(self.end, msg.off + length)

    def settle(self) -> None:
        """Report the writes that landed, oldest first, stopping at the first still running."""
        while self.pending and self.pending[0][2].done():
            msg, length, future = self.pending.popleft()
            self._written(msg, length, future.result())

    async def drain(self) -> None:
        for _, _, future in list(self.pending):
            await asyncio.wrap_future(future)
        self.settle()

    def abandon(self) -> None:
        """The stream is over: wait (briefly, a chunk's copy) for writes still running, so none lands in a
        buffer its owner has moved on from."""
        concurrent.futures.wait([future for _, _, future in self.pending])
        self.pending.clear()

    def _written(self, msg: Chunk, length: int, actual_sum: int) -> None:
        if self.receiver.chunk_written(msg, actual_sum, _now()):
            self.sink.record(msg.off, length, msg.sum)


class _Mailbox(Generic[T]):
    """A stream's messages, oldest first, and a wait for the next one with a timeout.

    The wait costs one future and one timer. ``asyncio.wait_for(queue.get(), timeout)`` (Python 3.11) wraps
    the get in a task of its own and the timeout in a second future: per wait, what one small message costs
    the broker to send, and a broker at 1,000 sites waits once per task it sends.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> T:
        return self._items.popleft()

    async def wait(self, timeout: float | None) -> bool:
        """Until a message is there or ``timeout`` seconds passed; whether one is there."""
        if self._items:
            return True
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        return bool(self._items)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


_WAKE: tuple[Message | None, list[memoryview]] = (None, [])
"""Put on a stream's queue when a placement thread finished a write."""

OfferHandler = Callable[[bytes, Offer], Awaitable[BufferSink | None]]


class Outbox(Protocol):
    """All a hub needs of its transport: sending. (Receiving is the owner's loop, which calls ``dispatch``.)"""

    async def send(self, peer: bytes, msg: Message, payload: Sequence[Any] = ()) -> None: ...


class StreamHub:
    """All streams of one endpoint, keyed by (peer, stream id).

    The owner feeds every stream-type message to ``dispatch``; ``send`` streams a model to a peer and
    returns once the receiver acknowledged it; ``on_offer`` decides whether to accept an incoming stream.
    """

    def __init__(
        self,
        endpoint: Outbox,
        *,
        on_offer: OfferHandler,
        chunk_size: int = DEFAULT_CHUNK,
        window: int = DEFAULT_WINDOW,
        alg: str = digest.DEFAULT_ALG,
        max_total: int = 1 << 40,
        stall_timeout: float = 30.0,
        pool: concurrent.futures.Executor | None = None,
    ) -> None:
        """``pool``: the threads that write received chunks into place and digest outgoing ones ahead of the
        loop; by default the process's shared placement threads (``placement_threads``: none on 2 cores)."""
        self.endpoint = endpoint
        self.pool = pool if pool is not None else _placement_pool()
        self.on_offer = on_offer
        self.chunk_size = chunk_size
        self.window = window
        self.alg = alg
        self.max_total = max_total
        self.stall_timeout = stall_timeout
        self._outgoing: dict[tuple[bytes, int], _Mailbox[Message]] = {}
        self._offers: dict[tuple[bytes, int], Offer] = {}  # of the outgoing streams, for reoffer_all
        self._incoming: dict[tuple[bytes, int], _Mailbox[tuple[Message | None, list[memoryview]]]] = {}
        self._receivers: dict[tuple[bytes, int], Receiver] = {}
        self._tasks: set[asyncio.Task] = set()
        self._accepting: set[tuple[bytes, int]] = set()
        self._received_since_trim = 0

    # --- sending -------------------------------------------------------------------------------------

    async def send(
        self,
        peer: bytes,
        source: ModelSource,
        ctx: dict | None = None,
        sid: int | None = None,
        *,
        resumed: bool = False,
    ) -> int:
        """Stream ``source`` to ``peer``; returns the stream id once acknowledged. Raises TransportError.

        ``resumed``: stream ``sid`` was begun by an earlier process of ours; the receiver, if it still holds
        it, answers the repeated offer with the offset to continue from."""
        sid = sid if sid is not None else secrets.randbits(62)
        sums = source.sums(self.chunk_size, self.alg)
        inline = source.total <= self.chunk_size and not resumed  # a small model rides in its offer
        sender = Sender(
            sid,
            header=source.layout.header,
            total=source.total,
            chunk_size=self.chunk_size,
            chunk_sums=sums,
            digest=sums.digest() if inline else sums.digest,
            alg=self.alg,
            ctx=ctx or {},
            now=_now(),
            stall_timeout=self.stall_timeout,
            resumed=resumed,
            inline=inline,
        )
        inbox: _Mailbox[Message] = _Mailbox()
        key = (peer, sid)
        self._outgoing[key] = inbox
        self._offers[key] = sender.offer()
        pool = self.pool
        try:
            await self._send_or_lose(peer, sender.offer(), [source.whole()] if inline else ())
            while True:
                if pool is not None:  # the next window's sums, ahead, off the loop
                    sums.prefetch(sender.sent_until, sender.credit + self.window, pool)
                for m in sender.next_messages(_now()):
                    payload = source.frames(m.off, sender.chunk_length(m.off)) if isinstance(m, Chunk) else ()
                    if not await self._send_or_lose(peer, m, payload):
                        break  # the rest of the batch would be lost too
                if sender.state in (SenderState.DONE, SenderState.FAILED):
                    break
                deadline = sender.deadline()
                timeout = None if deadline is None else max(0.0, deadline - _now())
                if not await inbox.wait(timeout):
                    continue
                while not inbox.empty():
                    sender.receive(inbox.get_nowait(), _now())
        finally:
            del self._outgoing[key]
            del self._offers[key]
        if sender.state is SenderState.FAILED:
            raise TransportError(f"stream {sid} to {peer!r} failed: {sender.failure}")
        return sid

    async def _send_or_lose(self, peer: bytes, msg: Message, payload: Sequence[Any]) -> bool:
        """Send one message of an outgoing stream; False if the peer has no connection right now.

        A peer that is reconnecting (its socket gave up on a silent broker, a network blip) comes back under
        the same routing id, asks for the streams it was receiving from where it verified them (RESUME), and
        is offered again those it never heard of (``reoffer_all``). So a message that found no connection
        is treated as lost in transit, which the stream already survives, instead of failing the stream: the
        stall timeout still bounds the wait, and a peer declared gone has its streams aborted at once
        (``abort_peer``). Before, a site reconnecting while its model downloaded lost its task. A routing id
        that libzmq made up (first byte 0: an admin client, a script) never comes back, so there it fails now."""
        try:
            await self.endpoint.send(peer, msg, payload)
        except PeerUnreachable:
            if peer[:1] == b"\x00":
                raise
            return False
        return True

    # --- receiving -----------------------------------------------------------------------------------

    async def _accept(self, peer: bytes, offer: Offer, inline: list[memoryview]) -> None:
        key = (peer, offer.sid)
        try:
            await self._open(key, offer, inline)
        finally:
            self._accepting.discard(key)

    async def _open(self, key: tuple[bytes, int], offer: Offer, inline: list[memoryview]) -> None:
        peer = key[0]
        sink: BufferSink | None = None
        try:
            sink = await self.on_offer(peer, offer)
            if sink is None:
                await self.endpoint.send(peer, Abort(offer.sid, "refused"))
                return
            receiver = Receiver(offer, **self._receiver_options(offer.alg))
            sink.peer = peer
            sink.open(offer, inline=inline)
            done = inline and receiver.accept_inline(sum(f.nbytes for f in inline))
            acks = receiver.inline_written(sink.write(0, inline), _now()) if done else []
        except FedbusError as exc:
            log.warning("stream refused", peer=peer, sid=offer.sid, reason=str(exc))
            if sink is not None and not sink.result.done():
                sink.result.set_exception(exc)
            await self.endpoint.send(peer, Abort(offer.sid, f"refused: {exc}"))
            return
        if receiver.state is ReceiverState.DONE:  # it came inline: no stream task, no credit round trip
            try:
                if sink.settled is None:
                    for m in acks:
                        await self.endpoint.send(peer, m)
                await self._complete(peer, offer.sid, sink, acks if sink.settled is not None else [])
            except FedbusError as exc:
                log.warning("stream failed", peer=peer, sid=offer.sid, reason=str(exc))
                if not sink.result.done():
                    sink.result.set_exception(exc)
            finally:
                sink.close()
            return
        self._track(key, receiver, sink, resumed=False)

    def _receiver_options(self, alg: str) -> dict[str, Any]:
        """What every incoming stream's Receiver is built with, new or restored from a journal."""
        return {
            "window": self.window,
            "now": _now(),
            "digest_fn": lambda triples: digest.stream_digest(triples, alg),
            "max_total": self.max_total,
            "stall_timeout": self.stall_timeout,
        }

    def _track(self, key: tuple[bytes, int], receiver: Receiver, sink: BufferSink, *, resumed: bool) -> None:
        self._receivers[key] = receiver
        queue: _Mailbox[tuple[Message | None, list[memoryview]]] = _Mailbox()
        self._incoming[key] = queue
        self._spawn(self._receive(key, receiver, sink, queue, resumed))

    def resume_stream(self, path: str, *, max_total: int | None = None, expected: Any = None) -> BufferSink:
        """Pick up a journaled stream after a restart: the sender is asked to continue where we stopped."""
        sink, verified = BufferSink.reopen(path, max_total=max_total or self.max_total, expected=expected)
        assert sink.offer is not None
        receiver = Receiver.restore(sink.offer, verified, **self._receiver_options(sink.alg))
        self._track((sink.peer, sink.offer.sid), receiver, sink, resumed=True)
        return sink

    async def _receive(
        self,
        key: tuple[bytes, int],
        receiver: Receiver,
        sink: BufferSink,
        queue: _Mailbox[tuple[Message | None, list[memoryview]]],
        resumed: bool,
    ) -> None:
        peer, sid = key
        held: list[Message] = []
        loop = asyncio.get_running_loop()
        placements = _Placements(receiver, sink, self.pool, lambda: loop.call_soon_threadsafe(queue.put_nowait, _WAKE))
        try:
            for m in receiver.resume(_now()) if resumed else receiver.start():
                await self.endpoint.send(peer, m)
            while receiver.state is ReceiverState.RECEIVING:
                deadline = receiver.deadline()
                timeout = None if deadline is None else max(0.0, deadline - _now())
                if await queue.wait(timeout):
                    while not queue.empty():
                        msg, frames = queue.get_nowait()
                        if msg is not None:
                            await placements.feed(msg, frames)
                        placements.settle()
                for m in receiver.next_messages(_now()):
                    if isinstance(m, Ack) and sink.settled is not None:
                        held.append(m)  # sent once the owner recorded the stream's content
                        continue
                    # A sender that is away (killed, reconnecting) may come back and resume: its silence
                    # is the stall timeout's business (or the owner's, via abort_peer), not a failed send's.
                    with contextlib.suppress(TransportError):
                        await self.endpoint.send(peer, m)
            if receiver.state is ReceiverState.DONE:
                await self._complete(peer, sid, sink, held)
            elif not sink.result.done():
                sink.result.set_exception(TransportError(f"stream {sid} from {peer!r}: {receiver.failure}"))
        except FedbusError as exc:
            log.warning("stream failed", peer=peer, sid=sid, reason=str(exc))
            with contextlib.suppress(FedbusError):
                await self.endpoint.send(peer, Abort(sid, str(exc)))
            if not sink.result.done():
                sink.result.set_exception(exc)
        finally:
            placements.abandon()
            self._incoming.pop(key, None)
            self._receivers.pop(key, None)
            sink.close()
            self._received_since_trim += receiver.arrived
            if not self._incoming and self._received_since_trim >= TRIM_AFTER:
                self._received_since_trim = 0  # the last stream of a burst: its frames' memory goes back
                release_free_memory()
            if not sink.result.done():
                sink.result.set_exception(TransportError(f"stream {sid} from {peer!r} was cancelled"))

    async def _complete(self, peer: bytes, sid: int, sink: BufferSink, held: list[Message]) -> None:
        """A verified stream: its result to the owner, then the held ACK once the owner recorded it."""
        result = sink.finish()
        if sink.result.done():  # the owner stopped waiting (cancelled): nobody will release it
            getattr(result, "release", lambda: None)()
        else:
            sink.result.set_result(result)
        if held and sink.settled is not None:
            await asyncio.wait({sink.settled}, timeout=self.stall_timeout)
            recorded = sink.settled.done() and not sink.settled.cancelled() and not sink.settled.exception()
            for m in held if recorded else [Abort(sid, "the receiver could not record the stream")]:
                await self.endpoint.send(peer, m)

    # --- routing -------------------------------------------------------------------------------------

    async def dispatch(self, peer: bytes, msg: Message, payload: list[memoryview]) -> None:
        """Route one stream-type message from ``peer`` to the stream it belongs to."""
        key = (peer, msg.sid)  # type: ignore[attr-defined]
        if isinstance(msg, Offer):
            if key in self._incoming or key in self._accepting:
                receiver = self._receivers.get(key)
                if receiver is not None:  # its sender restarted (a site killed mid-upload): go on from here
                    log.info("stream resumed by its sender", peer=peer, sid=msg.sid, offset=receiver.offset)
                    for m in receiver.resume(_now()):
                        with contextlib.suppress(TransportError):
                            await self.endpoint.send(peer, m)
                return  # otherwise a duplicated offer: the stream is already being received
            # Accepting may wait (the owner can hold offers back to bound memory), so never block routing.
            self._accepting.add(key)
            self._spawn(self._accept(peer, msg, payload))
            return
        if isinstance(msg, Chunk | End) or (isinstance(msg, Abort) and key in self._incoming):
            queue = self._incoming.get(key)
            if queue is not None:
                queue.put_nowait((msg, payload))
            return
        outbox = self._outgoing.get(key)
        if outbox is not None:
            outbox.put_nowait(msg)

    async def reoffer_all(self, peer: bytes | None = None) -> None:
        """After a reconnect: offer every outgoing stream (to ``peer``) again. A receiver that still holds one
        answers with the offset to resume from; one that never heard of it (the offer found no connection)
        takes it as new; one that forgot it (a restarted peer) refuses it, so its sender fails now rather than
        after the stall timeout."""
        for (p, _sid), offer in list(self._offers.items()):
            if peer is None or p == peer:
                with contextlib.suppress(TransportError):
                    await self.endpoint.send(p, offer)

    def abort_peer(self, peer: bytes, reason: str, *, incoming: bool = True) -> None:
        """Give up every stream to ``peer``, and from it unless ``incoming`` is false (it was declared gone, or
        a new process took its place, which may still resume what the old one was sending): their owners hear
        at once."""
        for (p, sid), queue in list(self._incoming.items()) if incoming else []:
            if p == peer:
                queue.put_nowait((Abort(sid, reason), []))
        for (p, sid), outbox in list(self._outgoing.items()):
            if p == peer:
                outbox.put_nowait(Abort(sid, reason))

    async def resume_all(self, peer: bytes | None = None) -> None:
        """After a reconnect: ask every sender (of ``peer``) to continue from our last verified offset."""
        for (p, _sid), receiver in list(self._receivers.items()):
            if peer is None or p == peer:
                for m in receiver.resume(_now()):
                    await self.endpoint.send(p, m)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
