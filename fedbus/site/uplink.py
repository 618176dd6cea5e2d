"""The site's connection to the broker, as everything except the connection loop sees it.

Why a stable object over a changing socket: the daemon replaces its DEALER on every reconnect, but the
StreamHub and the job runners must not care. The hub's streams are keyed by (peer, sid) and survive the
swap, so an interrupted download resumes after the next welcome instead of starting over. Job events
that must reach the broker (started, exited, crashed, log records) go through ``report``: queued while
the broker is unreachable (bounded, oldest dropped first), sent in order after the next welcome.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

from fedbus.errors import TransportError
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.messages import Message
from fedbus.transport.endpoint import DealerEndpoint
from fedbus.transport.streams import OfferHandler, StreamHub

BACKLOG = 1000
RETRY_S = 0.1


class BrokerBus(Protocol):
    """What a job runner needs from the broker connection."""

    async def send(self, msg: Message) -> None:
        """Send now; raises TransportError while the broker is unreachable."""

    async def resume_stream(self, source: ModelSource, route: dict, sid: int) -> None:
        """Offer again a stream an earlier site process began; the broker says where to go on from."""

    def report(self, msg: Message) -> None:
        """Deliver eventually: queued while disconnected, sent after the next welcome."""

    async def stream(self, source: ModelSource, route: dict, sid: int) -> str:
        """Stream a model to the broker; returns its stream digest once acknowledged (TransportError if not)."""


class _HubOutbox:
    """What the StreamHub sends through: whichever socket is current."""

    def __init__(self, uplink: Uplink) -> None:
        self.uplink = uplink

    async def send(self, peer: bytes, msg: Message, payload: Sequence[Any] = ()) -> None:
        await self.uplink.send(msg, payload)


class Uplink:
    """The broker connection: sending, the model-stream hub, and the job-event backlog (a ``BrokerBus``)."""

    def __init__(self, *, on_offer: OfferHandler, **hub_options: Any) -> None:
        self.ep: DealerEndpoint | None = None
        self.welcomed = asyncio.Event()
        self.backlog: deque[Message] = deque(maxlen=BACKLOG)
        self._pending = asyncio.Event()
        self.sent_at = float("-inf")
        """The event loop's clock at the last message sent: traffic counts as a heartbeat."""
        self.hub = StreamHub(_HubOutbox(self), on_offer=on_offer, **hub_options)

    def attach(self, ep: DealerEndpoint) -> None:
        self.ep = ep

    def detach(self) -> None:
        """Close the current socket; sends fail with TransportError until the next ``attach``."""
        self.welcomed.clear()
        if self.ep is not None:
            self.ep.close()
            self.ep = None

    async def send(self, msg: Message, payload: Sequence[Any] = ()) -> None:
        if self.ep is None:
            raise TransportError("not connected to the broker")
        await self.ep.send(b"", msg, payload)
        self.sent_at = asyncio.get_running_loop().time()

    def report(self, msg: Message) -> None:
        self.backlog.append(msg)
        self._pending.set()

    async def stream(self, source: ModelSource, route: dict, sid: int) -> str:
        await self.hub.send(b"", source, route, sid)
        return source.sums(self.hub.chunk_size, self.hub.alg).digest()  # sums are cached: no re-read

    async def resume_stream(self, source: ModelSource, route: dict, sid: int) -> None:
        await self.hub.send(b"", source, route, sid, resumed=True)

    async def flush_loop(self) -> None:
        """Send reported messages whenever the broker is reachable, oldest first; runs for the daemon's life."""
        while True:
            await self._pending.wait()
            await self.welcomed.wait()
            while self.backlog and self.welcomed.is_set():
                try:
                    await self.send(self.backlog[0])
                except TransportError:
                    await asyncio.sleep(RETRY_S)
                    continue
                self.backlog.popleft()
            if not self.backlog:
                self._pending.clear()

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) until the backlog is sent, if the broker is reachable at all."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.backlog and self.welcomed.is_set():
                    await asyncio.sleep(0.01)

    async def close(self) -> None:
        await self.hub.close()
        self.detach()
