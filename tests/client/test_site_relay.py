"""A real site daemon relays what the client API needs: ``Task.options`` untouched, and ``submit_model`` tasks
(cross-site evaluation) whose answer, the site's local model, is uploaded like a training result."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from fedbus.modelio.sources import ModelSource
from fedbus.protocol.messages import Deploy, EndJob, Task
from tests.site.helpers import FakeBroker, fake_broker, job_archive, running_site, sample_model

pytestmark = pytest.mark.timeout(60)

# Trains (+1) and keeps its model; a submit_model task is answered with that model; every task's options and
# name are logged, so the test sees what reached the script.
KEEPER = """
import fedbus.client as flare

flare.init()
local = None
while flare.is_running():
    model = flare.receive()
    opts = flare.get_config()["options"]
    flare.log("task", {"name": flare.get_task_name(), "submit": flare.is_submit_model(), **opts})
    if flare.is_submit_model():
        flare.send(flare.FLModel(params=local))
        continue
    local = {k: v + 1 for k, v in model.params.items()}
    flare.send(flare.FLModel(params=local, meta={"NUM_STEPS_CURRENT_ROUND": 2}))
"""


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[FakeBroker]:
    async with fake_broker(tmp_path) as fake:
        yield fake


async def test_options_reach_the_script_and_a_submitted_model_is_uploaded(tmp_path: Path, broker: FakeBroker) -> None:
    archive = job_archive(tmp_path / "job", KEEPER)
    model = sample_model()
    async with running_site(tmp_path / "ws", broker.address):
        await broker.wait_hellos(1)
        await broker.send(Deploy(job_id="j1", script="client.py", args=[], config={"site_index": 0}), [archive])
        await broker.expect("job_event", event="started")

        sid = secrets.randbits(62)
        options = {"fedprox_mu": 0.5, "transfer_type": "FULL", "custom": [1, 2]}
        await broker.send(Task("j1", "t-1", "train", 0, 0, 1, sid=sid, params_type="FULL", options=options))
        await broker.hub.send(broker.peer, ModelSource.from_state_dict(model), {"job_id": "j1", "task_id": "t-1"}, sid)
        logged = await broker.expect("job_event", event="log")
        assert logged.data["value"] == {"name": "train", "submit": False, **options}
        result, sink = await broker.uploads.get()
        assert result.task_id == "t-1" and result.weight == 2.0
        await sink.result

        # cross-site evaluation asks for the local model: no model goes down, the site's model comes up
        await broker.send(Task("j1", "s-1", "submit_model", 1, 1, 1, sid=None, options={"submit_model": True}))
        logged = await broker.expect("job_event", event="log")
        assert logged.data["value"] == {"name": "submit_model", "submit": True, "submit_model": True}
        result, sink = await broker.uploads.get()
        assert result.task_id == "s-1" and result.params_type == "FULL"
        submitted = await sink.result
        for name, t in model.items():
            assert torch.equal(submitted[name], t + 1), name
        await broker.send(EndJob("j1", "finished"))
        await broker.expect("job_event", event="exited")


# Puts the names of the site's control data into its own meta: the first task's result with its trained params,
# the second's with none, pointing at a file it wrote itself where the site would look for a result.
SPOOFER = """
from pathlib import Path

import fedbus.client as flare
from fedbus.modelio import serde

flare.init()
while flare.is_running():
    model = flare.receive()
    task_id = model.meta["task_id"]
    if task_id == "t-1":
        meta = {"path": "/etc/hostname", "take": True, "fedbus/train_s": -1.0, "NUM_STEPS_CURRENT_ROUND": 2}
        flare.send(flare.FLModel(params={k: v + 1 for k, v in model.params.items()}, meta=meta))
    else:
        planted = Path(flare.system_info()["workspace"]) / "outbox" / f"{task_id}.safetensors"
        serde.write_file(planted, {k: v * 0 for k, v in model.params.items()})
        flare.send(flare.FLModel(meta={"path": str(planted), "fedbus/train_s": 0.0}))
"""


async def test_a_scripts_meta_reaches_the_broker_untouched_and_controls_nothing(
    tmp_path: Path, broker: FakeBroker
) -> None:
    archive = job_archive(tmp_path / "job", SPOOFER)
    model = sample_model()
    async with running_site(tmp_path / "ws", broker.address):
        await broker.wait_hellos(1)
        await broker.send(Deploy(job_id="j1", script="client.py", args=[], config={"site_index": 0}), [archive])
        await broker.expect("job_event", event="started")

        sid = secrets.randbits(62)
        await broker.send(Task("j1", "t-1", "train", 0, 0, 2, sid=sid, params_type="FULL"))
        await broker.hub.send(broker.peer, ModelSource.from_state_dict(model), {"job_id": "j1", "task_id": "t-1"}, sid)
        result, sink = await broker.uploads.get()
        assert result.task_id == "t-1" and result.weight == 2.0
        assert result.meta == {
            "path": "/etc/hostname",
            "take": True,
            "fedbus/train_s": -1.0,
            "NUM_STEPS_CURRENT_ROUND": 2,
        }
        assert result.path is None and result.train_s is None  # the script's file and timing stay at the site
        uploaded = await sink.result
        for name, t in model.items():  # the outbox file flare.send wrote, not the file the meta names
            assert torch.equal(uploaded[name], t + 1), name

        # No params sent: nothing is uploaded, whatever file the script's meta names.
        sid = secrets.randbits(62)
        await broker.send(Task("j1", "t-2", "train", 1, 1, 2, sid=sid, params_type="FULL"))
        await broker.hub.send(broker.peer, ModelSource.from_state_dict(model), {"job_id": "j1", "task_id": "t-2"}, sid)
        result = await broker.expect("result", task_id="t-2")
        assert result.sid is None and result.path is None and result.weight == 1.0
        assert result.meta["path"].endswith("outbox/t-2.safetensors") and result.meta["fedbus/train_s"] == 0.0
        assert broker.uploads.empty() and not broker.refused
        await broker.send(EndJob("j1", "finished"))
        await broker.expect("job_event", event="exited")
