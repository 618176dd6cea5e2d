"""Placement threads: the threads that write received chunks into their sink, and the order they report in.

Writing a chunk into place (the first touch of fresh buffer pages, the copy out of zmq's frame, the digest of
what landed) is most of a receiver's work. With spare cores it runs on these threads, the event loop only
routing; the receiver still hears of every write in the order it accepted the chunks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque
from collections.abc import Callable

from fedbus._cores import thread_count, usable_cores
from fedbus.protocol.messages import Chunk, End, Message
from fedbus.protocol.stream import Receiver
from fedbus.transport.byteio import Sink

PLACEMENT_MIN = 1 << 20
"""Chunks smaller than this are written by the event loop itself: a thread hop would cost more than the copy."""


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
        sink: Sink,
        pool: concurrent.futures.Executor | None,
        wake: Callable[[], object],  # its result is ignored
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
