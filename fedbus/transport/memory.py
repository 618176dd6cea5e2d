"""The in-memory transport: endpoints joined by a ``MemoryHub`` in one event loop, no sockets.

A ``MemoryEndpoint`` has the interface of the zmq endpoints (``fedbus.transport.endpoint.Endpoint``: ``send``,
``recv``, ``close``), so whatever drives an endpoint (a ``StreamHub``, a receive loop) runs over it unchanged.
It is the fake for tests of the logic above the sockets: streams, credit, reordering, resume, where a real
socket would add only timing noise (``tests/transport``). Messages still go through the envelope codec, so
validation is exercised exactly as on the wire, and payload frames are copied once (as a socket copies them),
so a sender may reuse its buffers as soon as ``send`` returns. Nothing is lost or reordered unless a test wraps
an endpoint to do it; a send to a peer that is not (or no longer) on the hub raises ``PeerUnreachable``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from fedbus.errors import PeerUnreachable, RemoteProtocolError
from fedbus.protocol.envelope import decode, encode
from fedbus.protocol.messages import Message
from fedbus.transport.endpoint import BadMessage, Incoming


class MemoryEndpoint:
    """One peer on a ``MemoryHub``, known to the others by ``name``; ``default_peer`` is where ``send(b"")`` goes
    (a dealer's one peer)."""

    def __init__(self, name: bytes, hub: MemoryHub, default_peer: bytes = b"") -> None:
        self.name = name
        self.hub = hub
        self.default_peer = default_peer
        self.inbox: asyncio.Queue[tuple[bytes, list[bytes]]] = asyncio.Queue()

    async def send(self, peer: bytes, msg: Message, payload: Sequence[Any] = ()) -> None:
        target = self.hub.endpoints.get(peer or self.default_peer)
        if target is None:
            raise PeerUnreachable(f"peer {peer or self.default_peer!r} is not connected")
        frames = [encode(msg), *(bytes(p) for p in payload)]
        target.inbox.put_nowait((self.name, frames))

    async def recv(self) -> Incoming:
        """The next message; one that does not decode raises ``BadMessage`` naming its sender."""
        peer, frames = await self.inbox.get()
        try:
            msg, mid = decode(frames[0])
        except RemoteProtocolError as exc:
            raise BadMessage(peer, str(exc)) from exc
        return Incoming(peer, msg, mid, [memoryview(f) for f in frames[1:]])

    def close(self) -> None:
        """Leave the hub: sends to this endpoint fail from now on."""
        if self.hub.endpoints.get(self.name) is self:
            del self.hub.endpoints[self.name]


class MemoryHub:
    """The 'network' joining ``MemoryEndpoint``s by name."""

    def __init__(self) -> None:
        self.endpoints: dict[bytes, MemoryEndpoint] = {}

    def endpoint(self, name: bytes, default_peer: bytes = b"") -> MemoryEndpoint:
        """A new endpoint called ``name`` (taking the name over from any earlier one, as a reconnect does)."""
        ep = MemoryEndpoint(name, self, default_peer)
        self.endpoints[name] = ep
        return ep
