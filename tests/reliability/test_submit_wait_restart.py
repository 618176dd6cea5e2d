"""``fedbus submit --wait`` rides over a broker that went away mid-job and started again on its workspace, and
FedBuff's counters in status go on from what the broker recorded instead of starting again from zero. A real CLI
process, real sockets, real scripts; FedBuff's recount itself is checked without IO."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

from fedbus.admin import Admin
from fedbus.broker import Broker
from fedbus.config import BrokerConfig, SiteConfig
from fedbus.site import Site
from fedbus.strategy import Update
from fedbus.strategy.fedbuff import FedBuff
from tests.e2e.procs import ROOT
from tests.reliability.jobs import deterministic_job

pytestmark = pytest.mark.timeout(150)  # generous: process starts on a loaded machine
K = 2  # FedBuff's buffer: each version folds exactly K accepted updates


def _fedbuff_job(folder: Path) -> Path:
    deterministic_job(folder, sites=2, rounds=1, pause=0.6)  # its script and model; the strategy is FedBuff
    (folder / "job.toml").write_text(
        'name = "buff"\nmodel = "model.safetensors"\n\n[strategy]\nname = "fedbuff"\nconcurrency = 2\n'
        f'buffer_size = {K}\nnum_versions = 5\nstaleness = "constant"\n\n[script]\npath = "client.py"\n'
        'args = ["0.6"]\n\n[sites]\nmin = 2\nmax = 2\n'
    )
    return folder


async def test_submit_wait_rides_over_a_broker_restart_and_fedbuff_counts_stay_cumulative(tmp_path: Path) -> None:
    """The broker (in this process, on a real socket) stops mid-job without a word, as a killed one would, and
    another starts on its workspace; ``fedbus submit --wait`` is a real CLI process, the scripts real processes."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    job = _fedbuff_job(tmp_path / "job")
    cfg = BrokerConfig(bind=f"ipc://{tmp_path}/broker.sock", workspace=str(tmp_path / "broker"), heartbeat_s=0.5)
    async with contextlib.AsyncExitStack() as stack:
        broker = Broker(cfg)
        await broker.__aenter__()
        stack.push_async_callback(broker.__aexit__, None, None, None)  # once more at the end: a no-op if stopped
        for i in (1, 2):
            site = SiteConfig(name=f"site-{i}", broker=cfg.bind, workspace=str(tmp_path / f"s{i}"), heartbeat_s=0.2)
            await stack.enter_async_context(Site(site))
        cli = await asyncio.create_subprocess_exec(
            *(
                sys.executable,
                "-m",
                "fedbus.cli",
                "submit",
                str(job),
                "--wait",
                "--broker",
                cfg.bind,
                "--timeout",
                "40",
            ),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(90):
                while not (running := broker.store.jobs(("running",))) or broker.store.latest_version(
                    running[0]["id"]
                ) in (None, (0, broker.store.checkpoint_path(running[0]["id"], 0))):
                    await asyncio.sleep(0.02)
            job_id = running[0]["id"]
            await broker.__aexit__(None, None, None)  # gone mid-job; nobody is told
            await asyncio.sleep(0.5)
            async with Broker(cfg) as broker, Admin(broker.address, timeout=30) as admin:
                assert broker.store.job(job_id)["version"] >= 1  # type: ignore[index]
                async with asyncio.timeout(40):
                    while "live" not in (job := (await admin.status(job_id))["jobs"][0]):
                        assert job["state"] in ("waiting", "running"), job
                        await asyncio.sleep(0.05)
                state = job["live"]["strategy"]
                # Every version folded K accepted updates, and those in the buffer are accepted too: counted since
                # the job began (a count from the restart would lack the K of each version before it).
                assert state["accepted"] == K * state["version"] + state["buffered"], state
                assert sum(state["updates_per_version"].values()) == state["accepted"], state
                out, _ = await asyncio.wait_for(cli.communicate(), 60)
            text = out.decode()
            assert cli.returncode == 0, text
            assert text.splitlines()[-1].startswith("finished version 5"), text
        finally:
            if cli.returncode is None:
                cli.kill()
                await cli.wait()


def _diff(site: str, task: str, base: int) -> Update:
    return Update(site, task, base, {"w": torch.ones(2)}, "DIFF", 1.0, {})


def test_fedbuff_recount_counts_what_the_checkpoint_holds_and_restore_counts_the_rest() -> None:
    s = FedBuff(concurrency=2, buffer_size=2, num_versions=9, staleness="constant")
    s.start({"w": torch.zeros(2)}, ["a", "b"], 0.0, version=2)
    records = [  # accepted at base v with staleness s lands in v + s + 1
        {"task_id": "1", "version": 0, "accepted": 1, "staleness": 0, "reason": ""},
        {"task_id": "2", "version": 0, "accepted": 1, "staleness": 0, "reason": ""},
        {"task_id": "3", "version": 0, "accepted": 1, "staleness": 1, "reason": ""},
        {"task_id": "4", "version": 1, "accepted": 1, "staleness": 0, "reason": ""},
        {"task_id": "5", "version": 1, "accepted": 1, "staleness": 1, "reason": ""},  # lands in 3: restored below
        {"task_id": "6", "version": -1, "accepted": 0, "staleness": None, "reason": "stale: s=4 > max_staleness=3"},
        {"task_id": "7", "version": -1, "accepted": 0, "staleness": None, "reason": "script crashed: code 1"},
    ]
    s.recount(records, evaluations=3)
    state = s.state()
    assert (state["accepted"], state["dropped_stale"], state["evaluated"]) == (4, 1, 3)
    assert state["staleness_hist"] == {"0": 3, "1": 1} and state["updates_per_version"] == {"0": 3, "1": 1}
    s.restore(_diff("a", "5", 1))
    assert s.state()["accepted"] == 5 and s.state()["buffered"] == 1
