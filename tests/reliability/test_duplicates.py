"""The same update delivered twice counts once: a hand-driven site sends its result and its stream twice, at
once and again later (as a retransmission after a reconnect would), to a real broker process. The broker
folds it in once; the copy that got as far as the strategy is refused as a duplicate, with that reason."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
import zmq.asyncio

from fedbus.admin import Admin
from fedbus.modelio.sinks import BufferSink
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.messages import STREAM_TYPES, Hello, Result, Task
from fedbus.transport.endpoint import DealerEndpoint
from fedbus.transport.streams import StreamHub
from tests.broker.harness import wait_job, write_job
from tests.e2e.procs import start_broker

pytestmark = pytest.mark.timeout(90)


def test_a_result_delivered_twice_counts_once(tmp_path: Path) -> None:
    job = write_job(tmp_path / "job", min_clients=1, rounds=2)
    (job / "job.toml").write_text((job / "job.toml").read_text().replace("min = 3\nmax = 3", "min = 1\nmax = 1"))
    broker, address = start_broker(tmp_path)
    try:

        async def scenario() -> tuple[dict, dict]:
            ctx = zmq.asyncio.Context()
            ep = DealerEndpoint.connect(ctx, address, identity=b"site:site-1")
            models: asyncio.Queue[BufferSink] = asyncio.Queue()

            async def on_offer(peer: bytes, offer: object) -> BufferSink:
                sink = BufferSink(max_total=1 << 20)
                models.put_nowait(sink)
                return sink

            hub = StreamHub(ep, on_offer=on_offer, chunk_size=4096, window=1 << 16)
            tasks: asyncio.Queue[Task] = asyncio.Queue()

            async def pump() -> None:
                while True:
                    inc = await ep.recv()
                    if inc.msg.TYPE in STREAM_TYPES:
                        await hub.dispatch(inc.peer, inc.msg, inc.payload)
                    elif isinstance(inc.msg, Task):
                        tasks.put_nowait(inc.msg)

            pumping = asyncio.ensure_future(pump())
            try:
                await ep.send(b"", Hello(role="site", name="site-1", session="s1"))
                async with Admin(address) as admin:
                    job_id = await admin.submit(job)
                    task = await asyncio.wait_for(tasks.get(), 30)
                    model = await asyncio.wait_for((await models.get()).result, 30)
                    update = ModelSource.from_state_dict({k: v + 1 for k, v in model.items()})

                    def result(sid: int) -> Result:
                        return Result(job_id, task.task_id, task.version, "FULL", 1.0, {"loss": 1.0}, {}, sid)

                    async def stream(sid: int) -> None:
                        with contextlib.suppress(Exception):  # a copy may be refused: that is the point
                            await hub.send(b"", update, {"job_id": job_id, "task_id": task.task_id}, sid)

                    await ep.send(b"", result(101))  # twice at once: both announced before either arrives
                    await ep.send(b"", result(102))
                    await asyncio.gather(stream(101), stream(102))
                    await ep.send(b"", result(103))  # and once more, later
                    await stream(103)
                    async with asyncio.timeout(30):  # round 1 closed: version 1 is out
                        while (await admin.status(job_id))["jobs"][0]["version"] < 1:
                            await asyncio.sleep(0.1)
                    await admin.abort(job_id)  # round 2 is not this test's business
                    done = await wait_job(admin, job_id, timeout=30)
                    data = await admin.download(job_id, tmp_path / "out")
                    return done, data
            finally:
                pumping.cancel()
                await asyncio.gather(pumping, return_exceptions=True)
                await hub.close()
                ep.close()
                ctx.destroy(linger=0)

        done, data = asyncio.run(scenario())
        assert done["state"] == "aborted", done["reason"]
        rows = [u for u in data["updates"] if u["task_id"].startswith("0-site-1-")]
        assert sum(u["accepted"] for u in rows) == 1, rows  # folded in once
        refused = [u["reason"] for u in rows if not u["accepted"]]
        assert refused and all("duplicate" in r for r in refused), rows  # the copy reached the strategy, refused
        assert data["history"][1]["metrics"]["strategy/num_updates"] == 1  # the aggregate holds one update
    finally:
        broker.stop()
