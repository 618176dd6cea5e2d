"""hello-pt end to end: a real broker and three real site daemons, FedAvg for 3 rounds over tcp loopback."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedbus.admin import Admin
from tests.e2e.procs import ROOT, federation

JOB = ROOT / "examples/hello-pt/job"
pytestmark = pytest.mark.timeout(240)


def hello_pt_net():
    spec = importlib.util.spec_from_file_location("hello_pt_net", JOB / "net.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(JOB))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(JOB))
    return module


def heldout_accuracy(state: dict[str, torch.Tensor]) -> float:
    net = hello_pt_net()
    model = net.Net()
    model.load_state_dict(state)
    return net.evaluate(model, net.heldout_loader())


async def wait_for_state(admin: Admin, job_id: str, states: tuple[str, ...], timeout: float) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        job = (await admin.status(job_id))["jobs"][0]
        if job["state"] in states:
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {job}")


def test_hello_pt_three_sites_three_rounds(tmp_path: Path) -> None:
    with federation(tmp_path, sites=3) as (broker, address, sites):

        async def scenario() -> tuple[str, dict, dict]:
            async with Admin(address) as admin:
                job_id = await admin.submit(JOB)
                job = await wait_for_state(admin, job_id, ("finished", "failed", "aborted"), 180)
                data = await admin.download(job_id, tmp_path / "download")
                return job_id, job, data

        job_id, job, data = asyncio.run(scenario())
        assert job["state"] == "finished", job["reason"]
        assert [h["version"] for h in data["history"]] == [0, 1, 2, 3]
        accepted = [u for u in data["updates"] if u["accepted"]]
        for version in (0, 1, 2):  # every round aggregated from all three sites
            assert sorted(u["site"] for u in accepted if u["version"] == version) == ["site-1", "site-2", "site-3"]
        checkpoints = sorted((tmp_path / "broker/jobs" / job_id / "models").glob("v*.safetensors"))
        assert [p.name for p in checkpoints] == [f"v{i}.safetensors" for i in range(4)]
        initial = load_file(checkpoints[0])
        final = load_file(checkpoints[-1])
        assert all(torch.equal(final[k], v) for k, v in load_file(data["model_path"]).items())
        before, after = heldout_accuracy(initial), heldout_accuracy(final)
        assert after > before + 0.2, (before, after)
        assert data["history"][-1]["metrics"]["accuracy"] > 0.5
    # federation() stopped everything with SIGTERM: a clean shutdown exits 0
    assert broker.proc.returncode == 0, broker.log_path.read_text()[-2000:]
    assert all(s.proc.returncode == 0 for s in sites)
    shutil.rmtree(tmp_path / "download", ignore_errors=True)
