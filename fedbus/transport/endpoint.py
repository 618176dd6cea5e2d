"""Endpoints: send and receive (envelope, payload frames) over ZeroMQ (in memory: ``fedbus.transport.memory``).

This is the only module that touches zmq sockets. A ``RouterEndpoint`` binds (the broker) and addresses
peers by routing id; a ``DealerEndpoint`` connects (sites, admins, training scripts) and has one peer.
Payload frames go out with ``copy=False`` (frames under ``COPY_BELOW`` are copied anyway, where a copy is
cheaper than the zero-copy bookkeeping) and come in as zero-copy ``memoryview``s of zmq's frames.

Sockets are plain (blocking-API) zmq sockets driven by the endpoint itself: every send and receive is tried
at once without blocking, and only a call that would block waits, on the socket's file descriptor in the
event loop. zmq's descriptor signals changes, not readiness: any operation on the socket may consume the
signal another direction waits for, so the endpoint reads ``EVENTS`` after every operation while anyone
waits, and again before it sleeps. pyzmq's asyncio wrapper does the same with a future, a callback and a
timer per call, several times the cost of a small message (docs/benchmarks.md).

Socket options, and why:
* ``ROUTER_MANDATORY``: a send to an unknown peer raises instead of vanishing silently.
* ``ROUTER_HANDOVER``: a site that reconnects under the same identity takes over its old routing entry,
  so a stream can resume on the new connection.
* HWM of 10,000 messages (a broker's ``peer_queue``): the credit window, not the HWM, bounds bytes in flight;
  the HWM only has to be large enough never to refuse a credited chunk (a window of 64 MiB in chunks of at
  least 64 KiB is 1,024 messages a stream).
* ``MAXMSGSIZE``: zmq disconnects a peer that sends a frame over the cap before the frame is allocated.
* ``LINGER``: explicit and short, so closing never hangs on a dead peer.

No send waits on another peer. A ROUTER never waits for room: a message to a peer whose queue is full is
dropped (``PeerOverflow``, a ``PeerUnreachable``: lost in transit, as to a peer that is reconnecting), and a
peer that stays full is cut off for a cool-down (``fedbus.transport.overflow``). A DEALER has one peer, so
waiting for room holds nobody else; still it waits at most ``send_timeout`` seconds, then raises
``SendStalled`` (its owner reconnects), so that a peer that never reads cannot hold a task forever.

Lanes. One TCP connection is copied by one zmq I/O thread on each side, and on a host with spare cores that
thread is the limit of a large stream. A ``DealerEndpoint`` with ``lanes`` > 1 opens that many connections to
the same ROUTER and spreads stream chunks over them in turn (an END follows its stream's last chunk on that
chunk's connection); everything else goes over the first. Each extra connection's routing id is the first's
plus ``LANE_MARK`` and its number, and the ROUTER reports its messages as the first connection's: the layers
above see one peer, and a lane carries exactly the authority of the connection it extends (the same CURVE key,
the same routing id, which for a site holds a secret token). Receivers put chunks that overtook one another
back in order (``fedbus.transport.streams``). ``fedbus bench transfer``: see ``stream_lanes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import zmq
import zmq.asyncio

from fedbus._cores import thread_count, usable_cores
from fedbus.errors import PeerUnreachable, RemoteProtocolError, TransportError
from fedbus.log import get_logger
from fedbus.protocol.envelope import MAX_ENVELOPE, decode, encode
from fedbus.protocol.messages import Chunk, End, Message
from fedbus.transport.overflow import Overflow

log = get_logger("transport.endpoint")

MAX_FRAME = 80 << 20
"""Largest single frame a peer may send: a 64 MiB chunk or job archive plus slack."""

HWM = 10_000
COPY_BELOW = 256 << 10
"""Frames smaller than this are copied on send. A zero-copy frame is tracked by pyzmq's collector thread until
libzmq lets go of it, which costs more than copying a frame below about 256 KiB (CPU per message sent and
received over tcp loopback); pyzmq's own threshold is 64 KiB. Small models, the common case at many sites,
go as a copy."""
LINGER_MS = 200
YIELD_EVERY = 64
STUCK_AFTER_S = 10.0
"""Seconds a ROUTER peer's queue may stay full (every send to it dropped) before the peer is cut off."""
COOLDOWN_S = 60.0
"""Seconds a cut-off peer stays cut off: its messages dropped unread, nothing sent to it."""
SEND_TIMEOUT_S = 60.0
"""Seconds a DEALER's send waits for room before ``SendStalled``."""
"""Receives in a row that find a message waiting before one yields to the event loop anyway."""

# Flags and events as plain ints: pyzmq's are IntFlag members, and every ``&`` or ``|`` on one builds a new
# enum member, many times the cost of an int operation. For the same reason a message's frames are sent and
# received one by one here (``RCVMORE`` read from the frame, not asked of the socket): ``send_multipart`` and
# ``recv_multipart`` cost about twice as much for a two-frame message (docs/benchmarks.md).
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_EVENTS = int(zmq.EVENTS)


def io_threads(*, server: bool = False) -> int:
    """zmq I/O threads for a daemon's context (``FEDBUS_IO_THREADS`` overrides); ``server``: the broker's.

    libzmq gives each connection to one I/O thread, which does that connection's TCP copies: with one
    thread a broker's every download and upload goes through one core. More threads let a broker's peers
    move bytes in parallel; one connection never spreads over two.

    A server on 8 cores or more gets twice as many (up to 8), because libzmq hands a new connection to the
    thread with the fewest sockets, not the least traffic: the listener and an idle admin client count as much
    as a site, and two sites on one thread take twice as long to upload. Threads with no connection cost nothing
    (docs/benchmarks.md).
    """
    cores = usable_cores()
    default = 1 if cores < 8 else min(4, cores // 4)
    return thread_count("FEDBUS_IO_THREADS", min(8, 2 * default) if server and cores >= 8 else default, minimum=1)


LANE_STAGGER = 0.005
"""Seconds between two lanes' connects. libzmq gives a connection the I/O thread with the fewest descriptors,
counted once that thread has taken the connection up: connections that arrive together all see the same
counts and land on one thread, whose one core then copies every lane (and a lane was meant to add a core).
So a dealer pins each lane to a thread of its own (``ZMQ_AFFINITY``; lanes share threads round-robin where the
context has fewer threads than lanes), and connects them a few ms apart, so that the receiving router has counted
one before it places the next (zmq's own reconnects are jittered). Chunks go over a lane once it has connected.
Without a running event loop (or over ``inproc://``, which uses no I/O thread) lanes connect at once.
``tests/transport/test_lanes.py`` checks that each lane is copied by an I/O thread of its own."""

LANE_MARK = b"\x00lane"
"""Between a connection's routing id and a lane number: a lane's routing id is ``id + LANE_MARK + bytes([k])``.
No routing id a peer is given has it (libzmq's own are 5 bytes; fedbus's are printable)."""
MAX_LANES = 8


def stream_lanes() -> int:
    """Connections a site (or the transfer bench) spreads its stream chunks over (``FEDBUS_LANES`` overrides).

    Two on 8 cores or more: one connection is copied by one I/O thread, whose core bounds it; a second
    connection on a thread of its own (``LANE_STAGGER``) adds a core's copying. On fewer cores there is no spare
    core for a second I/O thread, so one. Figures: docs/benchmarks.md.
    """
    default = 2 if usable_cores() >= 8 else 1
    return min(MAX_LANES, thread_count("FEDBUS_LANES", default, minimum=1))


def lane_base(peer: bytes) -> bytes:
    """The routing id of the connection that lane ``peer`` extends (``peer`` itself if it is no lane)."""
    return peer[:-6] if peer[-6:-1] == LANE_MARK else peer


def daemon_context(*, shared: bool = False, server: bool = False) -> zmq.asyncio.Context:
    """A zmq context with ``io_threads(server=server)`` I/O threads; ``shared``: the process's instance (made so
    once, by whichever asks first)."""
    threads = io_threads(server=server)
    if shared:
        return zmq.asyncio.Context.instance(io_threads=threads)
    return zmq.asyncio.Context(io_threads=threads)


@dataclass(slots=True)
class Incoming:
    """One received message: who sent it, the decoded envelope and its raw payload frames."""

    peer: bytes
    msg: Message
    mid: int
    payload: list[memoryview] = field(default_factory=list)
    user: str = ""
    """The participant name the broker's ZAP handler gave this connection (CURVE only; else empty)."""
    size: int = 0
    """Bytes of the message (envelope and payload frames), for its peer's byte budget."""


class BadMessage(RemoteProtocolError):
    """An undecodable or invalid message, with the identity of the peer that sent it (and its ZAP User-Id)."""

    def __init__(self, peer: bytes, reason: str, user: str = "", size: int = 0) -> None:
        super().__init__(reason)
        self.peer = peer
        self.user = user
        self.size = size
        """The message's bytes, for the peer's byte budget."""


class PeerOverflow(PeerUnreachable):
    """A ROUTER's message was dropped: its peer's queue is full (it does not read), or the peer is cut off."""


class SendStalled(TransportError):
    """A DEALER's peer took no message for the send timeout: its queue stayed full."""


class Endpoint(Protocol):
    """What the layers above need from a transport: send to a peer, receive the next message."""

    async def send(self, peer: bytes, msg: Message, payload: Sequence[Any] = ()) -> None: ...

    async def recv(self) -> Incoming: ...

    def close(self) -> None: ...


def _plain_socket(ctx: zmq.asyncio.Context, kind: int) -> zmq.Socket:
    """A plain (not asyncio) socket in ``ctx``: the endpoints wait on its descriptor themselves."""
    # pyzmq documents socket_class for a plain socket in an asyncio context, but types it as the context's own
    return ctx.socket(kind, socket_class=zmq.Socket)  # type: ignore[arg-type]


def _configure(sock: zmq.Socket, max_frame: int, hwm: int = HWM) -> None:
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.copy_threshold = COPY_BELOW


class _ZmqEndpoint:
    routed: bool = False
    authenticated: bool = False
    """A CURVE server socket: every message carries the ZAP User-Id of its connection."""

    send_timeout: float | None = SEND_TIMEOUT_S
    """Seconds a send waits for room under the HWM before ``SendStalled`` (None: as long as it takes)."""

    def __init__(self, sock: zmq.Socket, *, max_envelope: int) -> None:
        self.sock = sock
        self.max_envelope = max_envelope
        self._mid = 0
        self._readable: list[asyncio.Future[None]] = []  # receives waiting for a message
        self._writable: list[asyncio.Future[None]] = []  # sends waiting for room under the HWM
        self._watched: tuple[asyncio.AbstractEventLoop, int] | None = None
        self._streak = 0  # receives in a row that did not wait
        self.drained_at = time.monotonic()
        """When a receive last found nothing unread: every message that arrived before then has been read."""

    async def send(self, peer: bytes, msg: Message, payload: Sequence[Any] = ()) -> None:
        self._mid += 1
        frames: list[Any] = [encode(msg, self._mid), *payload]
        if self.routed:
            frames.insert(0, peer)
        await self.send_raw(frames)

    async def send_raw(self, frames: Sequence[Any]) -> None:
        """Send ``frames`` as they are (a ROUTER's first frame is the peer): ``send`` without the envelope,
        for tests that play a broken peer. Any other direct use of ``sock`` may starve a waiting receive.
        Waits for room at most ``send_timeout`` seconds (``SendStalled``)."""
        deadline: float | None = None
        while True:
            try:
                self._send_frames(frames)
                break
            except zmq.Again:
                loop = asyncio.get_running_loop()
                if deadline is None:
                    deadline = loop.time() + (self.send_timeout if self.send_timeout is not None else float("inf"))
                if loop.time() >= deadline:
                    raise SendStalled(f"the peer took no message for {self.send_timeout:g} s") from None
                await self._wait(self._writable, deadline)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    raise PeerUnreachable(f"peer {bytes(frames[0])!r} is not connected") from exc
                raise TransportError(f"send failed: {exc}") from exc
        if self._readable:
            self._on_events()

    def _send_frames(self, frames: Sequence[Any]) -> None:
        """One message, frame by frame; only its first frame can meet a full queue (zmq.Again), and then
        nothing of it was sent."""
        sock, last = self.sock, len(frames) - 1
        for i, frame in enumerate(frames):
            sock.send(frame, _NOBLOCK if i == last else _NOBLOCK_MORE, copy=False)

    def _recv_frames(self) -> list[zmq.Frame]:
        frame = self.sock.recv(_NOBLOCK, copy=False)
        frames = [frame]
        while frame.more:
            frame = self.sock.recv(_NOBLOCK, copy=False)
            frames.append(frame)
        return frames

    async def recv(self) -> Incoming:
        self._streak += 1
        if self._streak >= YIELD_EVERY:  # a busy socket must not starve the loop's other tasks
            self._streak = 0
            await asyncio.sleep(0)
        dropped = 0
        while True:
            sock = self.sock
            try:
                frames = self._recv_frames()
            except zmq.Again:
                self._streak = 0
                self.drained_at = time.monotonic()
                await self._wait(self._readable)
                continue
            except zmq.ZMQError:
                if sock is self.sock:
                    raise
                continue  # the socket was replaced under us (RouterEndpoint.rebind): read the new one
            peer = lane_base(frames.pop(0).bytes) if self.routed else b""
            if not self._ignore(peer):
                break
            dropped += 1  # from a cut-off peer: not even decoded
            if dropped % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        if self._writable:
            self._on_events()
        if not frames:
            raise BadMessage(peer, "empty message")
        user = str(frames[0].get("User-Id") or "") if self.authenticated else ""
        try:
            msg, mid = decode(frames[0].buffer, self.max_envelope)
        except RemoteProtocolError as exc:
            raise BadMessage(peer, str(exc), user, sum(len(f) for f in frames)) from exc
        payload = [f.buffer for f in frames[1:]]
        return Incoming(peer, msg, mid, payload, user, len(frames[0]) + sum(p.nbytes for p in payload))

    def _ignore(self, peer: bytes) -> bool:
        """Whether a message from ``peer`` is dropped unread (a ROUTER's cut-off peers)."""
        return False

    def close(self) -> None:
        self._unwatch()
        self.sock.close(linger=LINGER_MS)

    # --- readiness ---------------------------------------------------------------------------------------

    async def _wait(self, waiters: list[asyncio.Future[None]], deadline: float | None = None) -> None:
        """Until the socket may be ready in the direction of ``waiters`` (the caller then tries again), or the
        loop's clock passed ``deadline``."""
        loop = asyncio.get_running_loop()
        fd = self.sock.fileno()  # zmq.FD, typed as the int it is
        if self._watched != (loop, fd):
            self._unwatch()
            loop.add_reader(fd, self._on_events)
            self._watched = (loop, fd)
        ready = loop.create_future()
        waiters.append(ready)
        self._on_events()  # the signal may have been consumed already, by the operation that just failed
        timer = None
        if deadline is not None and deadline != float("inf") and not ready.done():
            timer = loop.call_at(deadline, _wake, ready)
        try:
            await ready
        finally:
            if timer is not None:
                timer.cancel()
            with contextlib.suppress(ValueError):
                waiters.remove(ready)

    def backlogged(self) -> bool:
        """Messages wait unread in the socket. (Reading the socket's events may take the signal a waiting send
        needs, so this wakes waiters as every other operation here does.)"""
        return bool(self._on_events() & _POLLIN)

    def _on_events(self) -> int:
        """Wake the waiters of each direction the socket is ready in (a closed socket wakes all: they see why);
        returns the events."""
        try:
            events = cast(int, self.sock.getsockopt(_EVENTS))  # an int option; pyzmq types them all int | bytes
        except zmq.ZMQError:
            events = _POLLIN | _POLLOUT
        for flag, waiters in ((_POLLIN, self._readable), (_POLLOUT, self._writable)):
            if events & flag:
                for ready in waiters:
                    if not ready.done():
                        ready.set_result(None)
        return events

    def _unwatch(self) -> None:
        """Stop watching the socket's descriptor (before it is closed), waking every waiter to try again."""
        if self._watched is not None:
            loop, fd = self._watched
            self._watched = None
            if not loop.is_closed():
                loop.remove_reader(fd)
        for ready in (*self._readable, *self._writable):
            if not ready.done():
                ready.set_result(None)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


class RouterEndpoint(_ZmqEndpoint):
    """The bound side (broker): many peers, each addressed by its routing id.

    A send never waits (see the module's doc): a message that does not fit its peer's queue is dropped with
    ``PeerOverflow``, and a peer full for ``STUCK_AFTER_S`` is cut off for ``COOLDOWN_S``: ``on_stuck(peer)``
    is called once, its later messages are dropped before they are decoded, and nothing more is sent to it.

    Why cut off rather than disconnect: libzmq cannot close one connection of a ROUTER (``rebind`` closes them
    all, which would punish every peer for one). What the cut-off peer holds is its queue, at most ``HWM``
    messages, and one connection; both go when it disconnects, and with CURVE it cannot connect again during
    the cool-down (the owner refuses its key in ZAP: ``fedbus.transport.curve.Authenticator.refuse_for``).
    Its messages still arrive (libzmq reads them), and each costs one routing-id lookup here. (Considered: a
    connection of our own under the peer's routing id makes ``ROUTER_HANDOVER`` terminate the peer's pipe, which
    frees its queue and stops its messages, but its TCP connection stays, a CURVE broker would need a key of its
    own in ZAP for it, and on plaintext the peer can take its id back the same way.)
    """

    routed = True
    send_timeout = None  # never waits: see send_raw

    on_stuck: Any = None
    """``on_stuck(peer)``: called once when ``peer`` is cut off for staying full."""

    @classmethod
    def bind(
        cls,
        ctx: zmq.asyncio.Context,
        address: str,
        *,
        max_frame: int = MAX_FRAME,
        max_envelope: int = MAX_ENVELOPE,
        configure: Any = None,
        curve_secret: bytes | None = None,
        hwm: int = HWM,
        stuck_after: float = STUCK_AFTER_S,
        cooldown: float = COOLDOWN_S,
    ) -> RouterEndpoint:
        """With ``curve_secret`` the socket is a CURVE server asking ZAP (domain ``fedbus``) about every
        connection: bind the authenticator in ``ctx`` first (``fedbus.transport.curve.Authenticator``).
        ``hwm``: messages queued per peer; ``stuck_after``, ``cooldown``: see the class's doc."""

        def make() -> zmq.Socket:
            sock = _plain_socket(ctx, zmq.ROUTER)
            _configure(sock, max_frame, hwm)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            if curve_secret is not None:
                sock.setsockopt(zmq.CURVE_SERVER, 1)
                sock.setsockopt(zmq.CURVE_SECRETKEY, curve_secret)
                sock.setsockopt(zmq.ZAP_DOMAIN, b"fedbus")
            if configure is not None:
                configure(sock)
            return sock

        sock = make()
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise TransportError(f"cannot bind {address}: {exc}") from exc
        ep = cls(sock, max_envelope=max_envelope)
        ep.authenticated = curve_secret is not None
        ep._make = make
        ep.overflow = Overflow(stuck_after=stuck_after, cooldown=cooldown)
        return ep

    _make: Any = None
    overflow: Overflow

    async def send_raw(self, frames: Sequence[Any]) -> None:
        """Send now or drop: ``PeerOverflow`` when the peer's queue is full or the peer is cut off,
        ``PeerUnreachable`` when it has no connection."""
        peer = bytes(frames[0])
        now = time.monotonic()
        overflow = self.overflow
        if overflow.cut_off(peer, now):
            overflow.ignored()
            raise PeerOverflow(f"peer {peer[:80]!r} is cut off (it did not read): message dropped")
        try:
            self._send_frames(frames)
        except zmq.Again:
            if overflow.full(peer, now):
                log.warning("peer cut off: its queue stayed full", peer=peer[:80], for_s=overflow.stuck_after)
                if self.on_stuck is not None:
                    self.on_stuck(peer)
            raise PeerOverflow(f"peer {peer[:80]!r} does not read: its queue is full, message dropped") from None
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise PeerUnreachable(f"peer {peer[:80]!r} is not connected") from exc
            raise TransportError(f"send failed: {exc}") from exc
        overflow.sent(peer)
        if self._readable:
            self._on_events()

    def cut_off(self, peer: bytes) -> bool:
        """Whether ``peer`` is cut off now (its messages are dropped unread)."""
        return self.overflow.cut_off(peer, time.monotonic())

    def cut(self, peer: bytes, seconds: float | None = None) -> None:
        """Cut ``peer`` off now, for the cool-down or ``seconds`` (the owner's decision: e.g. the whole key was,
        or the peer floods refused messages)."""
        self.overflow.cut(peer, time.monotonic(), seconds)

    def _ignore(self, peer: bytes) -> bool:
        overflow = self.overflow
        if overflow.any_cut_off() and overflow.cut_off(peer, time.monotonic()):
            overflow.ignored(peer)
            return True
        return False

    def take_dropped(self) -> dict[bytes, int]:
        """Messages received from cut-off peers and dropped unread, per peer, since the last call."""
        return self.overflow.take_dropped()

    async def rebind(self, timeout: float = 5.0) -> None:
        """Close every connection: a new socket takes the same address, and peers reconnect (passing the
        handshake, and ZAP, again). libzmq cannot drop one peer of a ROUTER; this is how a revoked key's
        open connection is closed. Messages in flight are lost (streams resume or time out)."""
        address = self.address
        if not address.startswith("tcp://"):
            raise TransportError(f"rebind needs a tcp:// endpoint, not {address}")
        old, new = self.sock, self._make()
        self._unwatch()
        self.sock = new  # first: a receive waiting on the old socket moves over (see recv)
        old.close(linger=0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:  # the old listener closes in zmq's I/O thread: its port frees up a moment later
            try:
                new.bind(address)
                break
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or loop.time() > deadline:
                    new.close(linger=0)
                    raise TransportError(f"cannot bind {address} again: {exc}") from exc
                await asyncio.sleep(0.01)

    _bound = ""

    @property
    def address(self) -> str:
        """The bound address, with the real port when bound to port 0 or ``*`` (kept across a rebind)."""
        if not self._bound:
            self._bound = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self._bound


_next_thread: weakref.WeakKeyDictionary[zmq.Context, int] = weakref.WeakKeyDictionary()
"""Per context, the I/O thread the next dealer with lanes starts on: several in one process (tests, sites
sharing a context) take turns over the threads instead of all starting on the first."""


class _Lane(_ZmqEndpoint):
    """An extra connection of a ``DealerEndpoint``; chunks go over it only once it has connected, so none waits
    on a socket that has no connection to send on yet."""

    connected = False

    def connect_later(self, address: str, delay: float) -> None:
        """Connect after ``delay`` seconds on the running loop (at once for 0 or without a loop); a lane closed
        by then stays closed. ``address`` is the one the first connection connected to, so it is valid."""
        if delay > 0:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_later(delay, self._connect, address)
                return
        self._connect(address)

    def _connect(self, address: str) -> None:
        if self.sock.closed:
            return
        try:
            self.sock.connect(address)
        except zmq.ZMQError as exc:  # the context is ending: this lane is never used, the others carry on
            log.warning("a lane could not connect", address=address, reason=str(exc))
            return
        self.connected = True


class DealerEndpoint(_ZmqEndpoint):
    """The connecting side (site, admin, training script): one peer, reconnects by itself with backoff."""

    _lanes: tuple[_Lane, ...] = ()  # the extra connections stream chunks are spread over
    _turn = 0  # the connection the last chunk went over (0: this one, k: lane k)

    @classmethod
    def connect(
        cls,
        ctx: zmq.asyncio.Context,
        address: str,
        *,
        identity: bytes | None = None,
        max_frame: int = MAX_FRAME,
        max_envelope: int = MAX_ENVELOPE,
        configure: Any = None,
        curve: tuple[bytes, bytes, bytes] | None = None,
        lanes: int = 1,
    ) -> DealerEndpoint:
        """``curve`` = (server public key, own public key, own secret key) makes this a CURVE client.
        ``lanes``: connections to spread stream chunks over (see the module's doc); more than one needs a routing
        id, so one is made up where ``identity`` is not given."""
        if not 1 <= lanes <= MAX_LANES:
            raise TransportError(f"lanes must be in [1, {MAX_LANES}], got {lanes}")
        if lanes > 1 and not identity:
            identity = b"peer:" + secrets.token_hex(8).encode()

        threads = max(1, ctx.get(zmq.IO_THREADS))
        first = _next_thread.get(ctx, 0)
        if lanes > 1:
            _next_thread[ctx] = (first + lanes) % threads

        def make(routing_id: bytes | None, lane: int = 0) -> zmq.Socket:
            sock = _plain_socket(ctx, zmq.DEALER)
            _configure(sock, max_frame)
            if lanes > 1:  # each lane's copies on an I/O thread of its own, as far as there are (LANE_STAGGER)
                sock.setsockopt(zmq.AFFINITY, 1 << ((first + lane) % threads))
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
            if routing_id:
                sock.setsockopt(zmq.ROUTING_ID, routing_id)
            if curve is not None:
                sock.setsockopt(zmq.CURVE_SERVERKEY, curve[0])
                sock.setsockopt(zmq.CURVE_PUBLICKEY, curve[1])
                sock.setsockopt(zmq.CURVE_SECRETKEY, curve[2])
            if configure is not None:
                configure(sock)
            if lane:
                return sock  # connected by its _Lane, a little later
            try:
                sock.connect(address)
            except zmq.ZMQError as exc:
                sock.close(linger=0)
                raise TransportError(f"cannot connect to {address}: {exc}") from exc
            return sock

        ep = cls(make(identity), max_envelope=max_envelope)
        if identity:
            lane_ids = [identity + LANE_MARK + bytes([k]) for k in range(1, lanes)]
            ep._lanes = tuple(_Lane(make(i, k), max_envelope=max_envelope) for k, i in enumerate(lane_ids, 1))
            stagger = 0.0 if address.startswith("inproc://") else LANE_STAGGER  # inproc uses no I/O thread
            for k, lane in enumerate(ep._lanes, 1):
                lane.connect_later(address, k * stagger)
        ep._last_lane = {}
        return ep

    @property
    def lanes_connected(self) -> bool:
        """Whether every lane has connected (until then chunks go over those that have)."""
        return all(lane.connected for lane in self._lanes)

    _last_lane: dict[int, int]  # stream id -> the connection its last chunk went over

    async def send(self, peer: bytes, msg: Message, payload: Sequence[Any] = ()) -> None:
        if self._lanes:
            turn = self._lane_of(msg)
            if turn:
                self._mid += 1
                await self._lanes[turn - 1].send_raw([encode(msg, self._mid), *payload])
                return
        await super().send(peer, msg, payload)

    def _lane_of(self, msg: Message) -> int:
        """The connection ``msg`` goes over: chunks in turn (over lanes that have connected), an END after its
        stream's last chunk, else 0."""
        if isinstance(msg, Chunk):
            count = len(self._lanes) + 1
            turn = self._turn
            for _ in range(count):
                turn = (turn + 1) % count
                if not turn or self._lanes[turn - 1].connected:
                    break
            self._turn = turn
            last = self._last_lane
            last[msg.sid] = turn
            if len(last) > 1024:  # streams that failed before their END: forget the oldest
                del last[next(iter(last))]
            return turn
        if isinstance(msg, End):
            return self._last_lane.pop(msg.sid, 0)
        return 0

    def close(self) -> None:
        for lane in self._lanes:
            lane.close()
        super().close()
