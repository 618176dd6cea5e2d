"""A waiting job says what it waits for, in status and once in ``submit --wait``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from fedbus.broker.launcher import waiting_for
from fedbus.cli import _follow
from fedbus.config import SiteConfig
from fedbus.site import Site

from .harness import federation, wait_job, write_job


def job(min_sites: int, include: list[str] | None = None, sites: list[str] | None = None) -> dict[str, Any]:
    return {"spec": {"min_sites": min_sites, "include": include or []}, "sites": sites or []}


def test_waiting_for_names_what_is_missing() -> None:
    assert waiting_for(job(3), ["hospital-a", "hospital-b"]) == "3 sites needed, 2 connected: hospital-a, hospital-b"
    assert waiting_for(job(1), []) == "1 site needed, 0 connected"
    assert waiting_for(job(2, include=["a", "b"]), ["a", "c"]) == "2 sites of a, b needed, 1 connected: a"
    assert waiting_for(job(2), ["a", "b", "c"]) is None
    # a job resumed after a broker restart waits for its own sites, whoever else is connected
    assert waiting_for(job(2, sites=["a", "b"]), ["a", "c", "d"]) == "its sites must be back: b not connected"
    assert waiting_for(job(2, sites=["a", "b"]), ["b", "a"]) is None


@pytest.mark.timeout(90)
async def test_status_explains_a_waiting_job_until_its_sites_come(tmp_path: Path) -> None:
    async with federation(tmp_path, sites=2) as (broker, _, admin):
        job_id = await admin.submit(write_job(tmp_path / "job"))  # [sites] min = 3
        for _ in range(200):
            entry = (await admin.status(job_id))["jobs"][0]
            if entry["state"] == "waiting":
                break
            await asyncio.sleep(0.05)
        assert entry["state"] == "waiting"
        assert entry["waiting_for"] == "3 sites needed, 2 connected: site-1, site-2"
        third = Site(SiteConfig(name="site-3", broker=broker.address, workspace=str(tmp_path / "s3"), heartbeat_s=0.2))
        async with third:
            done = await wait_job(admin, job_id)
        assert done["state"] == "finished" and "waiting_for" not in done


class ScriptedAdmin:
    """The statuses a broker would answer, one per call (the last repeated)."""

    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        self.jobs = jobs

    async def status(self, job_id: str) -> dict[str, Any]:
        return {"jobs": [self.jobs.pop(0) if len(self.jobs) > 1 else self.jobs[0]]}


async def test_submit_wait_prints_what_the_job_waits_for_once(capsys: pytest.CaptureFixture[str]) -> None:
    waiting = {"state": "waiting", "version": None, "waiting_for": "3 sites needed, 2 connected: a, b"}
    running = {"state": "running", "version": 1, "last_metrics": {}}
    finished = {"state": "finished", "version": 2, "last_metrics": {"loss": 0.5}}
    admin = ScriptedAdmin([waiting, waiting, waiting, running, finished])
    assert await asyncio.wait_for(_follow(admin, "j"), timeout=30) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "waiting: 3 sites needed, 2 connected: a, b"
    assert lines.count(lines[0]) == 1 and lines[-1].startswith("finished version 2")
