"""A stream to a peer that is reconnecting waits for it (the offer is made again when it says hello) instead of
failing at the first message that finds no connection; a peer declared gone, or one whose routing id libzmq
made up (it never comes back), has its streams fail at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
import zmq.asyncio

from fedbus.errors import PeerUnreachable, TransportError
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.messages import Heartbeat
from fedbus.transport.endpoint import DealerEndpoint, RouterEndpoint
from tests.transport.conftest import Side, cancel_all, make_side, pump

pytestmark = pytest.mark.timeout(60)

OPTS = {"chunk_size": 64 << 10, "window": 256 << 10, "stall_timeout": 20.0}


@contextlib.asynccontextmanager
async def routed(tmp_path: Path) -> AsyncIterator[tuple[zmq.asyncio.Context, Side, list[asyncio.Future]]]:
    """A bound ROUTER side, pumping; the test adds its other pumps to the list, ended with the router's."""
    ctx = zmq.asyncio.Context()
    router = make_side(RouterEndpoint.bind(ctx, f"ipc://{tmp_path}/bus.sock"), **OPTS)
    tasks = [asyncio.ensure_future(pump(router))]
    try:
        yield ctx, router, tasks
    finally:
        await cancel_all(tasks)
        await router.hub.close()
        router.endpoint.close()
        ctx.term()


async def _heard(router: Side, count: int) -> None:
    async with asyncio.timeout(10):
        while sum(isinstance(i.msg, Heartbeat) for i in router.others) < count:
            await asyncio.sleep(0.01)


async def _gone(router: Side, client: DealerEndpoint, peer: bytes) -> None:
    """Close ``client`` and wait until the ROUTER has dropped its route."""
    client.close()
    async with asyncio.timeout(10):
        while True:
            try:
                await router.endpoint.send(peer, Heartbeat())
            except PeerUnreachable:
                return
            await asyncio.sleep(0.01)


async def test_a_model_offered_to_a_reconnecting_peer_arrives_once_it_is_back(tmp_path: Path) -> None:
    async with routed(tmp_path) as (ctx, router, tasks):
        first = DealerEndpoint.connect(ctx, router.endpoint.address, identity=b"site")
        await first.send(b"", Heartbeat())
        await _heard(router, 1)
        await _gone(router, first, b"site")  # its socket gave up (a silent broker, a blip): no route for now
        model = {"w": torch.randn(300_000), "step": torch.arange(7)}
        sending = asyncio.ensure_future(router.hub.send(b"site", ModelSource.from_state_dict(model)))
        await asyncio.sleep(0.3)
        assert not sending.done()  # the offer was lost in transit, not the stream (before: TransportError here)
        back = make_side(DealerEndpoint.connect(ctx, router.endpoint.address, identity=b"site"), **OPTS)
        tasks.append(asyncio.ensure_future(pump(back)))
        try:
            await back.endpoint.send(b"", Heartbeat())  # what a site's hello is to the broker
            await _heard(router, 2)
            await router.hub.reoffer_all(b"site")  # the broker, on that hello
            sink = await asyncio.wait_for(back.sinks.get(), 10)
            got = await asyncio.wait_for(sink.result, 20)
            await asyncio.wait_for(sending, 10)
            assert got.keys() == model.keys() and all(torch.equal(got[k], model[k]) for k in model)
        finally:
            await back.hub.close()
            back.endpoint.close()


async def test_a_stream_to_a_peer_declared_gone_fails_at_once_with_the_reason(tmp_path: Path) -> None:
    async with routed(tmp_path) as (_ctx, router, _tasks):
        sending = asyncio.ensure_future(router.hub.send(b"nobody", ModelSource.from_state_dict({"w": torch.ones(9)})))
        await asyncio.sleep(0.2)
        assert not sending.done()
        router.hub.abort_peer(b"nobody", "site gone: heartbeat timeout")
        with pytest.raises(TransportError, match="site gone: heartbeat timeout"):
            await asyncio.wait_for(sending, 5)


async def test_a_stream_to_a_peer_with_a_made_up_routing_id_fails_at_once(tmp_path: Path) -> None:
    # libzmq's own ids (a DEALER that set none: an admin client) are never seen again after a disconnect
    async with routed(tmp_path) as (ctx, router, _tasks):
        client = DealerEndpoint.connect(ctx, router.endpoint.address)
        await client.send(b"", Heartbeat())
        await _heard(router, 1)
        peer = router.others[0].peer
        assert peer[:1] == b"\x00"
        await _gone(router, client, peer)
        with pytest.raises(PeerUnreachable):
            await asyncio.wait_for(router.hub.send(peer, ModelSource.from_state_dict({"w": torch.ones(9)})), 5)
