"""Helpers for transport tests: two real endpoints joined by their hubs, each with a receive pump."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import zmq.asyncio

from fedbus.modelio.sinks import BufferSink
from fedbus.protocol.messages import STREAM_TYPES, Offer
from fedbus.transport.endpoint import BadMessage, DealerEndpoint, RouterEndpoint
from fedbus.transport.memory import MemoryHub
from fedbus.transport.streams import StreamHub


@dataclass
class Side:
    endpoint: object
    hub: StreamHub
    sinks: asyncio.Queue = field(default_factory=asyncio.Queue)
    bad: list[BadMessage] = field(default_factory=list)
    others: list = field(default_factory=list)


async def pump(side: Side) -> None:
    while True:
        try:
            inc = await side.endpoint.recv()
        except BadMessage as exc:
            side.bad.append(exc)
            continue
        if inc.msg.TYPE in STREAM_TYPES:
            await side.hub.dispatch(inc.peer, inc.msg, inc.payload)
        else:
            side.others.append(inc)


def make_side(endpoint, *, expected=None, max_total=1 << 34, **hub_kwargs) -> Side:
    side: Side

    async def on_offer(peer: bytes, offer: Offer) -> BufferSink:
        sink = BufferSink(max_total=max_total, expected=expected)
        side.sinks.put_nowait(sink)
        return sink

    side = Side(endpoint, StreamHub(endpoint, on_offer=on_offer, **hub_kwargs))
    return side


@contextlib.asynccontextmanager
async def linked(address: str, *, lanes: int = 1, **hub_kwargs) -> AsyncIterator[tuple[Side, Side]]:
    """A bound ROUTER side and a connected DEALER side (identity b'peer', over ``lanes`` connections), both pumping."""
    ctx = zmq.asyncio.Context(io_threads=lanes)
    router = make_side(RouterEndpoint.bind(ctx, address), **hub_kwargs)
    dealer_ep = DealerEndpoint.connect(ctx, router.endpoint.address, identity=b"peer", lanes=lanes)
    dealer = make_side(dealer_ep, **hub_kwargs)
    tasks = [asyncio.ensure_future(pump(router)), asyncio.ensure_future(pump(dealer))]
    try:
        yield router, dealer
    finally:
        await cancel_all(tasks)
        await router.hub.close()
        await dealer.hub.close()
        router.endpoint.close()
        dealer.endpoint.close()
        ctx.term()


@contextlib.asynccontextmanager
async def memory_linked(**hub_kwargs) -> AsyncIterator[tuple[Side, Side]]:
    """Sides ``a`` and ``b`` joined by the in-memory transport (``fedbus.transport.memory``; ``a`` sends to b'b' by
    default), both pumping."""
    hub = MemoryHub()
    a = make_side(hub.endpoint(b"a", default_peer=b"b"), **hub_kwargs)
    b = make_side(hub.endpoint(b"b"), **hub_kwargs)
    tasks = [asyncio.ensure_future(pump(a)), asyncio.ensure_future(pump(b))]
    try:
        yield a, b
    finally:
        await cancel_all(tasks)


async def cancel_all(tasks: list[asyncio.Future]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture(params=["tcp", "ipc"])
def address(request, tmp_path) -> str:
    return "tcp://127.0.0.1:0" if request.param == "tcp" else f"ipc://{tmp_path}/bus.sock"
