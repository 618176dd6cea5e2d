"""The broker's endpoint in a simulation: its socket for admins, an in-process hub for the simulated sites.

Why: 10,000 simulated sites cannot each hold a socket (a file descriptor and an I/O pipe apiece). They are
names on a ``MemoryHub`` instead (``fedbus.transport.memory``), all spoken for by one ``SiteHost``. The broker
sees one endpoint (``SimBrokerEndpoint``) with the interface of its router socket: a send to a site's name
goes over the hub, any other over the socket (the recipe's admin connection); a receive returns whichever
comes first. Messages on the hub go through the envelope codec and payloads are copied once, as on a socket,
so the broker's own decoding and validation run as they do in production. A send to a site that is not on
the hub (it left) raises ``PeerUnreachable``, as a router socket with ``ROUTER_MANDATORY`` does.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from fedbus.errors import PeerUnreachable, RemoteProtocolError
from fedbus.protocol.envelope import decode, encode
from fedbus.protocol.messages import Message
from fedbus.transport.endpoint import BadMessage, Incoming
from fedbus.transport.memory import MemoryHub

BROKER = b"broker"
"""The broker's name on the simulation's hub."""


class Inbox:
    """Frames put by senders on the hub (``put_nowait``), taken by one reader; or handed to a callback."""

    def __init__(self, on_put: Callable[[], None] | None = None) -> None:
        self.items: deque[tuple[bytes, list[bytes]]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.on_put = on_put

    def put_nowait(self, item: tuple[bytes, list[bytes]]) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        if self.on_put is not None:
            self.on_put()


class _Entry:
    """What a name on a ``MemoryHub`` needs: an ``inbox``."""

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox


def frames_of(msg: Message, payload: Sequence[Any]) -> list[bytes]:
    return [encode(msg), *(bytes(p) for p in payload)]


def incoming(peer: bytes, frames: list[bytes]) -> Incoming:
    """Decode frames taken from an inbox; an undecodable message raises ``BadMessage`` naming its sender."""
    try:
        msg, mid = decode(frames[0])
    except RemoteProtocolError as exc:
        raise BadMessage(peer, str(exc)) from exc
    return Incoming(peer, msg, mid, [memoryview(f) for f in frames[1:]])


class SimBrokerEndpoint:
    """The broker's endpoint: ``router`` (the bound socket) plus ``BROKER`` on ``hub`` (see the module docstring)."""

    def __init__(self, router: Any, hub: MemoryHub) -> None:
        self.router = router
        self.hub = hub
        self.inbox = Inbox()
        hub.endpoints[BROKER] = _Entry(self.inbox)  # type: ignore[assignment]
        self._from_router: asyncio.Task[Incoming] | None = None

    @property
    def address(self) -> str:
        return str(self.router.address)

    @property
    def drained_at(self) -> float:
        return asyncio.get_running_loop().time()

    def backlogged(self) -> bool:
        return False

    async def send(self, peer: bytes, msg: Message, payload: Sequence[Any] = ()) -> None:
        site = self.hub.endpoints.get(peer)
        if site is not None:
            site.inbox.put_nowait((BROKER, frames_of(msg, payload)))
        elif peer.startswith(b"site:"):
            raise PeerUnreachable(f"simulated site {peer!r} is not connected")
        else:
            await self.router.send(peer, msg, payload)

    async def recv(self) -> Incoming:
        while True:
            if self.inbox.items:
                return incoming(*self.inbox.items.popleft())
            if self._from_router is None:
                self._from_router = asyncio.ensure_future(self.router.recv())
            if self._from_router.done():
                done, self._from_router = self._from_router, None
                return done.result()
            self.inbox.waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait({self.inbox.waiter, self._from_router}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self.inbox.waiter = None

    def close(self) -> None:
        if self._from_router is not None:
            self._from_router.cancel()
        self.hub.endpoints.pop(BROKER, None)
        self.router.close()
