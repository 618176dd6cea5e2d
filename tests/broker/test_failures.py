"""Failures during a FedAvg job on real daemons: crashes, bad updates, lost sites."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fedbus.admin import Admin
from fedbus.broker import Broker
from fedbus.broker.controller import JobController
from fedbus.config import BrokerConfig, SiteConfig
from fedbus.site import Site
from tests.broker.harness import federation, wait_job, write_job

pytestmark = pytest.mark.timeout(120)


async def test_a_clean_job_runs_every_round_with_every_site(tmp_path: Path) -> None:
    async with federation(tmp_path) as (broker, _sites, admin):
        job_id = await admin.submit(write_job(tmp_path / "job", rounds=2))
        job = await wait_job(admin, job_id)
        assert job["state"] == "finished", job["reason"]
        updates = broker.store.updates(job_id)
        assert sorted((u["version"], u["site"]) for u in updates if u["accepted"]) == [
            (v, f"site-{i}") for v in (0, 1) for i in (1, 2, 3)
        ]
        final = broker.store.history(job_id)[-1]
        assert final["version"] == 2


async def test_a_crashed_script_leaves_the_job_going_when_min_clients_allows(tmp_path: Path) -> None:
    async with federation(tmp_path) as (broker, _sites, admin):
        job_id = await admin.submit(write_job(tmp_path / "job", mode="crash", min_clients=2, rounds=2))
        job = await wait_job(admin, job_id)
        assert job["state"] == "finished", job["reason"]
        accepted = [u for u in broker.store.updates(job_id) if u["accepted"]]
        assert {u["site"] for u in accepted} == {"site-1", "site-2"}
        crashes = broker.store.events(job_id, "crashed")
        assert crashes and crashes[0]["site"] == "site-3" and crashes[0]["data"]["code"] == 3


async def test_a_crashed_script_fails_the_job_when_min_clients_cannot_be_met(tmp_path: Path) -> None:
    async with federation(tmp_path) as (_broker, _sites, admin):
        job_id = await admin.submit(write_job(tmp_path / "job", mode="crash", min_clients=3, rounds=2))
        job = await wait_job(admin, job_id)
        assert job["state"] == "failed"
        assert "min_clients=3" in job["reason"]


@pytest.mark.parametrize(("mode", "reason"), [("nan", "non-finite"), ("shape", "shape")])
async def test_a_bad_update_is_refused_and_the_round_completes(tmp_path: Path, mode: str, reason: str) -> None:
    async with federation(tmp_path) as (broker, _sites, admin):
        job_id = await admin.submit(write_job(tmp_path / "job", mode=mode, min_clients=2, rounds=2))
        job = await wait_job(admin, job_id)
        assert job["state"] == "finished", job["reason"]
        refused = [u for u in broker.store.updates(job_id) if not u["accepted"]]
        assert refused and all(u["site"] == "site-3" for u in refused)
        assert reason in refused[0]["reason"]
        # the global model is the mean of the good updates only: every weight went up by exactly 1 per round
        import torch
        from safetensors.torch import load_file

        final = load_file(broker.store.checkpoint_path(job_id, 2))
        assert torch.equal(final["w"], torch.full((10,), 2.0))


async def test_a_site_back_before_its_round_closes_takes_its_task_again(tmp_path: Path) -> None:
    """site-1's daemon stops with its task unanswered and starts again while site-3 still trains: it gets the
    round's task again and the round closes with all three (min_clients=3), where before the job failed."""
    cfg = BrokerConfig(bind=f"ipc://{tmp_path}/broker.sock", workspace=str(tmp_path / "broker"), heartbeat_s=0.5)

    def site(i: int) -> Site:
        return Site(SiteConfig(name=f"site-{i}", broker=cfg.bind, workspace=str(tmp_path / f"s{i}"), heartbeat_s=0.2))

    async with Broker(cfg) as broker, site(2), site(3), Admin(cfg.bind) as admin:
        async with site(1):
            job_id = await admin.submit(write_job(tmp_path / "job", mode="slow", min_clients=3, rounds=1))
            async with asyncio.timeout(30):  # until site-1 holds its first task
                while job_id not in broker.controllers or not held_by(broker.controllers[job_id], "site-1"):
                    await asyncio.sleep(0.02)
            first = held_by(broker.controllers[job_id], "site-1")
        assert (await admin.status(job_id))["jobs"][0]["state"] == "running"  # site-2 and site-3 still at it
        async with site(1):
            job = await wait_job(admin, job_id)
        assert job["state"] == "finished", job["reason"]
        accepted = {u["site"]: u["task_id"] for u in broker.store.updates(job_id) if u["accepted"]}
        assert sorted(accepted) == ["site-1", "site-2", "site-3"]
        assert accepted["site-1"] not in first  # its second task, in the same round
        assert [h["version"] for h in broker.store.history(job_id)] == [0, 1]


def held_by(controller: JobController, site: str) -> set[str]:
    """The ids of the tasks in flight at ``site``."""
    return {t for t, sent in controller.streams.tasks.items() if sent.action.site == site}
