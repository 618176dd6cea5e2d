"""``flare.send()`` says whether the broker has the update: False when it was lost on the way (the broker refused
its upload), True once the broker acknowledged it; the script goes on either way. A real site, a real script."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest

from fedbus.modelio.sources import ModelSource
from fedbus.protocol.messages import Deploy, EndJob, Task
from tests.site.helpers import FakeBroker, job_archive, running_site, sample_model

pytestmark = pytest.mark.timeout(60)

REPORTER = """
import fedbus.client as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    delivered = flare.send(flare.FLModel(params=model.params, meta={flare.NUM_STEPS_CURRENT_ROUND: 1}))
    flare.log("delivered", int(delivered), model.current_round)
"""


async def _task(broker: FakeBroker, task_id: str, round_: int) -> None:
    sid = secrets.randbits(62)
    await broker.send(Task("j1", task_id, "train", round_, round_, 5, sid=sid, params_type="FULL"))
    source = ModelSource.from_state_dict(sample_model())
    await asyncio.wait_for(broker.hub.send(broker.peer, source, {"job_id": "j1", "task_id": task_id}, sid), 30)


async def test_send_returns_false_for_a_lost_update_and_true_once_the_broker_has_it(
    tmp_path: Path, broker: FakeBroker
) -> None:
    archive = job_archive(tmp_path / "job", REPORTER)
    async with running_site(tmp_path / "ws", broker.address):
        await broker.wait_hellos(1)
        await broker.send(Deploy(job_id="j1", script="client.py", args=[]), [archive])
        await broker.expect("job_event", event="started")
        broker.refuse_uploads = True  # what a broker does with an update of a task it closed already
        await _task(broker, "t-1", 1)
        lost = await broker.expect("job_event", event="log")
        assert lost.data == {"key": "delivered", "value": 0, "step": 1}
        broker.refuse_uploads = False
        await _task(broker, "t-2", 2)
        _, sink = await asyncio.wait_for(broker.uploads.get(), 30)
        await asyncio.wait_for(sink.result, 10)
        delivered = await broker.expect("job_event", event="log")
        assert delivered.data == {"key": "delivered", "value": 1, "step": 2}
        await broker.send(EndJob("j1", "finished"))
        assert (await broker.expect("job_event", event="exited")).code == 0
