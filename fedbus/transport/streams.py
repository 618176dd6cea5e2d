"""The pump: drives protocol stream state machines over an endpoint.

Theory of operation. Every outgoing stream runs in its own task: it asks its ``Sender`` for messages,
sends them (chunks with their payload frames, straight from the ``Source``'s memory), then sleeps until a control
message (credit, ack, nack, resume, abort) arrives or the sender's deadline passes. Every incoming stream
has a task too: chunks are checked by the ``Receiver`` before their bytes are touched, copied once into
the ``Sink``, digested there, and confirmed. All protocol decisions live in
``fedbus.protocol.stream``; this module only moves bytes and waits, so it stays a few dozen lines per side.

Bytes in flight per stream never exceed the receiver's credit window, so a 10 GiB stream costs the
sender nothing beyond its source and the receiver nothing beyond its sink. What the bytes mean is the
business of the source and sink (``fedbus.transport.byteio``; ``fedbus.modelio`` for models).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from fedbus import digest
from fedbus._memory import release_free_memory
from fedbus.errors import FedbusError, PeerUnreachable, TransportError
from fedbus.log import get_logger
from fedbus.protocol.messages import Abort, Ack, Chunk, End, Message, Offer
from fedbus.protocol.stream import Receiver, ReceiverState, Sender, SenderState
from fedbus.transport.byteio import Sink, Source
from fedbus.transport.placement import _now, _placement_pool, _Placements

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

log = get_logger("transport.streams")

T = TypeVar("T")


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

OfferHandler = Callable[[bytes, Offer], Awaitable[Sink | None]]


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
        source: Source,
        route: dict | None = None,
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
            header=source.header,
            total=source.total,
            chunk_size=self.chunk_size,
            chunk_sums=sums,
            digest=sums.digest() if inline else sums.digest,
            alg=self.alg,
            route=route or {},
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
        sink: Sink | None = None
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

    def _track(self, key: tuple[bytes, int], receiver: Receiver, sink: Sink, *, resumed: bool) -> None:
        self._receivers[key] = receiver
        queue: _Mailbox[tuple[Message | None, list[memoryview]]] = _Mailbox()
        self._incoming[key] = queue
        self._spawn(self._receive(key, receiver, sink, queue, resumed))

    def resume_stream(self, sink: Sink, verified: Sequence[tuple[int, int, int]]) -> Sink:
        """Pick up a journaled stream after a restart (``sink`` reopened with its ``verified`` chunks, e.g. by
        ``modelio.sinks.BufferSink.reopen``): the sender is asked to continue where we stopped."""
        assert sink.offer is not None
        receiver = Receiver.restore(sink.offer, verified, **self._receiver_options(sink.alg))
        self._track((sink.peer, sink.offer.sid), receiver, sink, resumed=True)
        return sink

    async def _receive(
        self,
        key: tuple[bytes, int],
        receiver: Receiver,
        sink: Sink,
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

    async def _complete(self, peer: bytes, sid: int, sink: Sink, held: list[Message]) -> None:
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

    def holds(self, peer: bytes, sid: int) -> bool:
        """Whether stream ``sid`` with ``peer`` is open here, either way (its traffic is credit-bounded)."""
        key = (peer, sid)
        return key in self._incoming or key in self._outgoing or key in self._accepting

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

    def received(self, peer: bytes, sid: int) -> int | None:
        """Bytes of incoming stream ``sid`` from ``peer`` that arrived so far; None if it is not being received."""
        receiver = self._receivers.get((peer, sid))
        return None if receiver is None else receiver.arrived

    def abort_incoming(self, peer: bytes, sid: int, reason: str) -> bool:
        """Give up one incoming stream on this side: its sender hears ``reason`` (an ABORT), its sink's result
        fails with it. False if the stream is not being received."""
        key = (peer, sid)
        receiver, queue = self._receivers.get(key), self._incoming.get(key)
        if receiver is None or queue is None:
            return False
        for m in receiver.abort(reason):
            self._spawn(self._tell(peer, m))
        queue.put_nowait(_WAKE)  # its task sees the stream failed and ends it
        return True

    async def _tell(self, peer: bytes, msg: Message) -> None:
        with contextlib.suppress(TransportError):
            await self.endpoint.send(peer, msg)

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
