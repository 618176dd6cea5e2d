"""The site runs jobs: deploy, relay a task and its model, report crashes, stop scripts for sure."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import psutil
import pytest
import torch

from fedbus.errors import TransportError
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.messages import Deploy, EndJob, Error, Hello, Result, Task, Welcome
from fedbus.transport.endpoint import DealerEndpoint
from tests.site.helpers import PLUS_ONE, FakeBroker, evil_archive, job_archive, running_site, sample_model

pytestmark = pytest.mark.timeout(60)

SLEEPER = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends this one
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("pids", os.getpid(), child.pid, flush=True)
time.sleep(60)
"""

CRASHER = """
print("loading data", flush=True)
raise RuntimeError("boom: the data folder is empty")
"""


def deploy(job_id: str, **config: object) -> Deploy:
    return Deploy(job_id=job_id, script="client.py", args=["--delta", "1.0"], config={"site_index": 0, **config})


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_a_train_task_comes_back_plus_one_and_end_job_stops_the_script(
    tmp_path: Path, broker: FakeBroker
) -> None:
    archive = job_archive(tmp_path / "job", PLUS_ONE, args=("--delta", "1.0"))
    async with running_site(tmp_path / "ws", broker.address) as site:
        await broker.wait_hellos(1)
        await broker.send(deploy("j1", num_sites=2, params_type="FULL"), [archive])
        started = await broker.expect("job_event", event="started")
        pid = started.data["pid"]
        assert psutil.pid_exists(pid)

        # A first update is refused (its task closed at the broker): lost, and the script carries on.
        model, sid = sample_model(), secrets.randbits(62)
        broker.refuse_uploads = True
        await broker.send(Task("j1", "t-0", "train", 2, 2, 5, sid=sid, params_type="FULL"))
        source = ModelSource.from_state_dict(model)
        await asyncio.wait_for(broker.hub.send(broker.peer, source, {"job_id": "j1", "task_id": "t-0"}, sid), 30)
        lost = await broker.expect("result")
        assert isinstance(lost, Result) and lost.task_id == "t-0" and lost.sid is not None
        async with asyncio.timeout(5):
            while not broker.refused:
                await asyncio.sleep(0.01)
        broker.refuse_uploads = False

        sid = secrets.randbits(62)
        await broker.send(Task("j1", "t-1", "train", 3, 3, 5, sid=sid, params_type="FULL"))
        download = asyncio.create_task(
            broker.hub.send(broker.peer, ModelSource.from_state_dict(model), {"job_id": "j1", "task_id": "t-1"}, sid)
        )
        log = await broker.expect("job_event", event="log")
        assert log.data == {"key": "version", "value": 3, "step": 3}
        result, sink = await asyncio.wait_for(broker.uploads.get(), 30)
        await asyncio.wait_for(download, 5)
        assert isinstance(result, Result) and result.job_id == "j1" and result.task_id == "t-1"
        assert (result.version, result.params_type, result.weight) == (3, "FULL", 5.0)
        assert "path" not in result.meta  # the site's local paths never reach the broker
        update = await asyncio.wait_for(sink.result, 10)
        assert set(update) == set(model)
        for name, t in model.items():
            expected = t + 1.0
            assert update[name].dtype == t.dtype
            assert update[name].view(torch.uint8).equal(expected.view(torch.uint8)), name  # bit-exact

        job = Path(site.workspace) / "jobs" / "j1"
        async with asyncio.timeout(5):  # both model files are removed once the upload is acknowledged
            while (job / "outbox" / "t-1.safetensors").exists() or (job / "inbox" / "t-1.safetensors").exists():
                await asyncio.sleep(0.02)
        # ... and released for reuse: t-0's files took t-1's model and result (else two would wait in each box)
        for box in ("inbox", "outbox"):
            assert len([p for p in (job / box).iterdir() if p.name.startswith(".free-")]) == 1, box
        await broker.send(EndJob("j1", "finished"))
        exited = await broker.expect("job_event", event="exited")
        assert exited.code == 0
        assert gone(pid)
        assert "script done" in (job / "script.log").read_text()
        assert not (job / "link.sock").exists()
        async with asyncio.timeout(5):
            while "j1" in site.runners:
                await asyncio.sleep(0.02)


IN_PLACE = """
import glob, os

import fedbus.client as flare

inbox = os.path.join(os.environ["FEDBUS_WORKSPACE"], "inbox")
flare.init()
while flare.is_running():
    model = flare.receive()
    flare.log("held", len(glob.glob(os.path.join(inbox, ".held-*"))), model.current_round)
    for v in model.params.values():
        v.add_(1.0)  # trained in place: with the file taken, the result is that file as it is
    del v  # the last view of this round's file, once ``model`` is rebound: the file is then recycled
    flare.send(flare.FLModel(params=model.params, meta={flare.NUM_STEPS_CURRENT_ROUND: 5}))
"""


async def test_a_script_takes_its_models_trains_them_in_place_and_the_files_are_recycled(
    tmp_path: Path, broker: FakeBroker
) -> None:
    archive = job_archive(tmp_path / "job", IN_PLACE)
    model = sample_model()
    async with running_site(tmp_path / "ws", broker.address) as site:
        await broker.wait_hellos(1)
        await broker.send(deploy("j1", num_sites=1), [archive])
        await broker.expect("job_event", event="started")
        job = Path(site.workspace) / "jobs" / "j1"
        for rnd, params_type in ((1, "FULL"), (2, "FULL"), (3, "DIFF")):
            sid = secrets.randbits(62)
            await broker.send(Task("j1", f"t-{rnd}", "train", rnd, rnd, 5, sid=sid, params_type=params_type))
            ctx = {"job_id": "j1", "task_id": f"t-{rnd}"}
            download = asyncio.create_task(broker.hub.send(broker.peer, ModelSource.from_state_dict(model), ctx, sid))
            held = await broker.expect("job_event", event="log")
            # the script took the file (the one held): FULL, it trains it; DIFF, a copy, the file the base
            assert held.data == {"key": "held", "value": 1, "step": rnd}
            result, sink = await asyncio.wait_for(broker.uploads.get(), 30)
            await asyncio.wait_for(download, 5)
            assert result.params_type == params_type
            update = await asyncio.wait_for(sink.result, 10)
            for name, t in model.items():
                if params_type == "FULL":
                    assert update[name].view(torch.uint8).equal((t + 1.0).view(torch.uint8)), name  # bit-exact
                else:
                    torch.testing.assert_close(update[name], torch.ones_like(t))  # (x + 1) - x
        # t-1's file went back to the inbox's pool once the script dropped its tensors, and took a later model
        assert not (job / "inbox" / "t-1.safetensors").exists() and not (job / "inbox" / "t-2.safetensors").exists()
        assert any(p.name.startswith(".free-") for p in (job / "inbox").iterdir())
        await broker.send(EndJob("j1", "finished"))
        await broker.expect("job_event", event="exited")
        async with asyncio.timeout(5):  # what the script still held when it ended is deleted
            while any(p.name.startswith(".held-") for p in (job / "inbox").iterdir()):
                await asyncio.sleep(0.02)


async def test_a_crashing_script_is_reported_with_its_log_tail(tmp_path: Path, broker: FakeBroker) -> None:
    archive = job_archive(tmp_path / "job", CRASHER)
    async with running_site(tmp_path / "ws", broker.address):
        await broker.wait_hellos(1)
        await broker.send(deploy("j2"), [archive])
        crashed = await broker.expect("job_event", event="crashed")
        assert crashed.code == 1
        assert "loading data" in crashed.detail and "boom: the data folder is empty" in crashed.detail


async def test_end_job_kills_a_script_and_its_children_that_ignore_sigterm(tmp_path: Path, broker: FakeBroker) -> None:
    archive = job_archive(tmp_path / "job", SLEEPER)
    async with running_site(tmp_path / "ws", broker.address, kill_after_s=0.3) as site:
        await broker.wait_hellos(1)
        await broker.send(deploy("j3"), [archive])
        await broker.expect("job_event", event="started")
        log = Path(site.workspace) / "jobs" / "j3" / "script.log"
        async with asyncio.timeout(20):
            while "pids" not in log.read_text():
                await asyncio.sleep(0.05)
        pids = [int(p) for p in log.read_text().split("pids", 1)[1].split()[:2]]
        assert all(psutil.pid_exists(p) for p in pids)
        await broker.send(EndJob("j3", "aborted"))
        exited = await broker.expect("job_event", event="exited")
        assert exited.code == -9
        async with asyncio.timeout(5):
            while not all(gone(p) for p in pids):
                await asyncio.sleep(0.05)


async def test_link_refuses_a_wrong_token_and_a_task_timeout_kills_the_script(
    tmp_path: Path, broker: FakeBroker
) -> None:
    archive = job_archive(tmp_path / "job", SLEEPER)
    async with running_site(tmp_path / "ws", broker.address, task_timeout_s=1.0) as site:
        await broker.wait_hellos(1)
        await broker.send(deploy("j4"), [archive])
        await broker.expect("job_event", event="started")
        runner = site.runners["j4"]
        assert runner.link is not None
        address = runner.link.address
        assert os.stat(address.removeprefix("ipc://")).st_mode & 0o777 == 0o600

        intruder = DealerEndpoint.connect(site.ctx, address)
        try:
            await intruder.send(b"", Hello(role="client", name="x", session="guess"))
            refused = (await asyncio.wait_for(intruder.recv(), 5)).msg
            assert isinstance(refused, Error) and refused.code == "bad_token"
            await intruder.send(b"", Result("j4", "t", 0, "FULL", 1.0))
            refused = (await asyncio.wait_for(intruder.recv(), 5)).msg
            assert isinstance(refused, Error) and refused.code == "hello_required"
        finally:
            intruder.close()

        # A task without a model is ready at once; the sleeping script never answers it.
        await broker.send(Task("j4", "t-9", "train", 0, 0, 1, sid=None))
        crashed = await broker.expect("job_event", event="crashed")
        assert "t-9 exceeded the task time limit of 1 s" in crashed.detail
        assert crashed.code == -9


async def test_path_traversal_in_the_archive_is_refused(tmp_path: Path, broker: FakeBroker) -> None:
    archive = evil_archive(job_archive(tmp_path / "job", CRASHER))
    async with running_site(tmp_path / "ws", broker.address) as site:
        await broker.wait_hellos(1)
        await broker.send(deploy("j5"), [archive])
        crashed = await broker.expect("job_event", event="crashed")
        assert "deploy failed" in crashed.detail and "'..'" in crashed.detail
        assert not (Path(site.workspace) / "jobs" / "evil.py").exists()
        assert not (Path(site.workspace) / "jobs" / "j5" / "files").exists()
        # The job is gone: a task for it is refused, and its model stream too.
        await broker.send(Task("j5", "t-1", "train", 0, 0, 1, sid=7))
        error = await broker.expect("error")
        assert isinstance(error, Error) and error.ref == "task" and "not running here" in error.reason
        with pytest.raises(TransportError, match="refused"):
            source = ModelSource.from_state_dict(sample_model())
            await broker.hub.send(broker.peer, source, {"job_id": "j5", "task_id": "t-1"}, 7)


async def test_unsafe_ids_are_refused_and_a_deep_workspace_still_gets_a_link(
    tmp_path: Path, broker: FakeBroker
) -> None:
    deep = tmp_path / ("deep-" * 20) / "ws"  # jobs/JOB/link.sock would not fit in an ipc address
    async with running_site(deep, broker.address) as site:
        await broker.wait_hellos(1)
        await broker.send(deploy("../../etc"), [b"not a zip"])
        error = await broker.expect("error")
        assert isinstance(error, Error) and error.ref == "deploy" and "safe name" in error.reason
        archive = job_archive(tmp_path / "job", SLEEPER)
        await broker.send(deploy("j6"), [archive])
        await broker.expect("job_event", event="started")
        link = site.runners["j6"].link
        assert link is not None
        sock = Path(link.address.removeprefix("ipc://"))
        assert not sock.is_relative_to(deep) and sock.stat().st_mode & 0o777 == 0o600
        await broker.send(Task("j6", "../../x", "train", 0, 0, 1, sid=None))
        error = await broker.expect("error")
        assert isinstance(error, Error) and "safe name" in error.reason
        await broker.send(Welcome("again", 0.2, 5))  # harmless repeats are accepted quietly
        await broker.send(EndJob("j6", "done"))
        await broker.expect("job_event", event="exited")
        async with asyncio.timeout(5):
            while sock.parent.exists():  # the private link folder goes with the job
                await asyncio.sleep(0.02)
