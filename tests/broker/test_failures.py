"""Failures during a FedAvg job on real daemons: crashes, bad updates, lost sites."""

from __future__ import annotations

from pathlib import Path

import pytest

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
