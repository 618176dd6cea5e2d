"""Per-peer limits at a real broker over real sockets: a peer over a limit is refused with a reason (an
``error`` reply and a log line) and another peer, served at the same time, notices nothing."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import structlog
import torch

from fedbus import jobs
from fedbus.admin import Admin
from fedbus.broker import Broker
from fedbus.config import BrokerConfig
from fedbus.modelio import serde
from fedbus.protocol.envelope import MAX_ENVELOPE
from fedbus.protocol.messages import Abort, Offer, Reply, Request
from tests.broker.harness import write_job
from tests.reliability.peers import raw_peer

pytestmark = pytest.mark.timeout(60)


def _config(tmp: Path, **kw) -> BrokerConfig:
    return BrokerConfig(bind="tcp://127.0.0.1:0", workspace=str(tmp / "broker"), **kw)


async def test_a_flooding_peer_is_rate_limited_and_others_are_served(tmp_path: Path) -> None:
    cfg = _config(tmp_path, max_requests_per_s=20, request_burst=10)
    with structlog.testing.capture_logs() as logs:
        async with Broker(cfg) as broker, raw_peer(broker.address, b"flood") as flood:
            for rid in range(200):
                await flood.send(Request(rid=rid, op="sites"))
            refused = await flood.wait_for(lambda m: m.TYPE == "error" and m.code == "rate_limited")
            assert "requests/s" in refused.msg.reason and refused.msg.ref == "request"
            async with Admin(broker.address) as admin:  # a polite peer, while the flooder is throttled
                for _ in range(5):
                    assert "sites" in await admin.status()
            await asyncio.sleep(0.3)
            answered = sum(isinstance(i.msg, Reply) for i in flood.inbox)
            assert 9 <= answered <= 40, answered  # the burst, plus what 20/s refilled meanwhile
            told = len(flood.errors("rate_limited"))  # once per run of refusals, not once per message
            assert 1 <= told <= answered - 9 + 1 and told + answered < 200
            await asyncio.sleep(0.2)  # refilled: the flooder is served again
            await flood.send(Request(rid=999, op="sites"))
            await flood.wait_for(lambda m: m.TYPE == "reply" and m.rid == 999)
    assert sum(e["event"] == "peer over its request rate: refusing" for e in logs) == told


async def test_streams_in_flight_per_peer_are_capped(tmp_path: Path) -> None:
    cfg = _config(tmp_path, max_streams_per_peer=2)
    archive = jobs.pack_job(write_job(tmp_path / "job"), include_model=False)
    lay = serde.layout({"w": torch.zeros(10)})  # the job's model, offered and then never sent
    with structlog.testing.capture_logs() as logs:
        async with Broker(cfg) as broker, raw_peer(broker.address, b"greedy") as greedy:
            ids = []
            for rid in range(3):
                await greedy.send(Request(rid=rid, op="submit", args={"model_bytes": lay.total}), [archive])
                reply = await greedy.wait_for(lambda m, r=rid: m.TYPE == "reply" and m.rid == r)
                ids.append(reply.msg.data["job_id"])
            for sid, job_id in enumerate(ids, start=1):  # three model uploads that never send a chunk
                route = {"job_id": job_id, "kind": "model"}
                offer = Offer(sid, lay.total, 1 << 16, "sum64", "d", lay.header, route)
                await greedy.send(offer)
            refused = await greedy.wait_for(lambda m: m.TYPE == "error" and m.code == "too_many_streams")
            assert "2 streams" in refused.msg.reason
            await greedy.wait_for(lambda m: isinstance(m, Abort) and m.sid == 3)
            assert not any(isinstance(i.msg, Abort) and i.msg.sid in (1, 2) for i in greedy.inbox)
            async with Admin(broker.address) as admin:  # another peer still submits and uploads a job
                job_id = await admin.submit(write_job(tmp_path / "job2"))
                async with asyncio.timeout(10):
                    while (await admin.status(job_id))["jobs"][0]["state"] == "uploading":
                        await asyncio.sleep(0.05)
    assert any(e["event"] == "peer over its streams in flight: refusing" for e in logs)


async def test_envelope_and_model_caps_refuse_with_a_reason(tmp_path: Path) -> None:
    cfg = _config(tmp_path, max_model_mb=1)
    async with Broker(cfg) as broker, raw_peer(broker.address, b"big") as big:
        await big.send_raw([b"\x81" + os.urandom(MAX_ENVELOPE + 10)])
        bad = await big.wait_for(lambda m: m.TYPE == "error" and m.code == "bad_message")
        assert "envelope" in bad.msg.reason
        archive = jobs.pack_job(write_job(tmp_path / "job"), include_model=False)
        await big.send(Request(rid=1, op="submit", args={"model_bytes": 2 << 20}), [archive])
        reply = (await big.wait_for(lambda m: m.TYPE == "reply")).msg
        assert not reply.ok and "model_bytes" in reply.error
        async with Admin(broker.address) as admin:
            assert "jobs" in await admin.status()
