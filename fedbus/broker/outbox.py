"""What the broker sends: messages, refusals and model streams to its peers.

One object owns the way out so that the parts of the broker (admin requests, job launching, uploads, the job
controllers) send through the same path: every model stream is timed in the metrics, and a task's model is in
the audit trail with its digest; a refusal is in the trail before the peer hears of it. The endpoint and the
stream hub exist once the broker has started (``attach``).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from fedbus.broker.guard import Guard
from fedbus.broker.metrics import CountingEndpoint, Metrics
from fedbus.broker.registry import Registry
from fedbus.errors import FedbusError
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.messages import Error, Message
from fedbus.transport.streams import StreamHub


class Outbox:
    """The broker's way out; the ``Bus`` its job controllers use (``fedbus.broker.controller``)."""

    def __init__(self, registry: Registry, guard: Guard, metrics: Metrics) -> None:
        self.registry = registry
        self.guard = guard
        self.metrics = metrics
        self.endpoint: CountingEndpoint | None = None
        self.hub: StreamHub | None = None

    def attach(self, endpoint: CountingEndpoint, hub: StreamHub) -> None:
        self.endpoint, self.hub = endpoint, hub

    def peer_of(self, site: str) -> bytes | None:
        return self.registry.peer_of(site)

    async def send(self, peer: bytes, msg: Message, payload: Any = ()) -> None:
        assert self.endpoint is not None
        await self.endpoint.send(peer, msg, payload)

    async def send_error(self, peer: bytes, code: str, reason: str, ref: str = "") -> None:
        """Refuse a peer's message (``error``); a peer that cannot be reached any more is not told."""
        self.guard.audit.flush()  # a refusal is in the trail before the peer hears of it
        with contextlib.suppress(FedbusError):
            await self.send(peer, Error(code=code, reason=reason[:500], ref=ref))

    async def stream(self, peer: bytes, source: ModelSource, route: dict, sid: int) -> None:
        """Stream a model to a peer; a task's model is audited with the digest of its chunks."""
        assert self.hub is not None
        start, ok = time.monotonic(), False
        try:
            await self.hub.send(peer, source, route, sid)
            ok = True
        finally:
            self.metrics.stream_done("out", source.total, time.monotonic() - start, ok)
        if "task_id" in route:
            rec = self.registry.by_peer(peer)
            self.guard.audit.record(
                "task_sent",
                job=route.get("job_id"),
                task=route["task_id"],
                site=rec.name if rec is not None else None,
                size=source.total,
                digest=source.sums(self.hub.chunk_size, self.hub.alg).digest(),
            )
