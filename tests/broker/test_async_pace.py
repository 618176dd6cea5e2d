"""One site 10x slower than the others: FedBuff's versions advance at the fast sites' pace, while
FedAvg's rounds wait for the slow one (real daemons, real scripts)."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from tests.broker.harness import federation, wait_job, write_job

pytestmark = pytest.mark.timeout(120)
SLOW_S = 2.0  # site-3's time per task; the others take 0.2 s (see harness.SCRIPT, mode "slow")


def gaps(history: list[dict]) -> list[float]:
    return [b["time"] - a["time"] for a, b in itertools.pairwise(history)]


async def test_fedbuff_outpaces_a_straggler_that_fedavg_waits_for(tmp_path: Path) -> None:
    async with federation(tmp_path) as (broker, _sites, admin):
        avg = await admin.submit(write_job(tmp_path / "avg", mode="slow", min_clients=3, rounds=3))
        avg_job = await wait_job(admin, avg, timeout=90)
        buff_toml = 'name = "fedbuff"\nconcurrency = 3\nbuffer_size = 2\nnum_versions = 6\nmax_staleness = 10\n'
        buff = await admin.submit(write_job(tmp_path / "buff", mode="slow", strategy=buff_toml))
        buff_job = await wait_job(admin, buff, timeout=90)
        avg_hist, buff_hist = broker.store.history(avg), broker.store.history(buff)
        buff_updates = [u for u in broker.store.updates(buff) if u["accepted"]]
    assert avg_job["state"] == "finished", avg_job["reason"]
    assert buff_job["state"] == "finished", buff_job["reason"]
    avg_gaps = gaps(avg_hist[1:])  # between rounds: every round waits for site-3
    assert min(avg_gaps) >= SLOW_S * 0.9
    # FedBuff: six versions published in less time than FedAvg needs for two rounds
    assert buff_hist[-1]["time"] - buff_hist[1]["time"] < 2 * SLOW_S
    fast = sum(1 for u in buff_updates if u["site"] != "site-3")
    assert fast >= 10  # the versions were made of the fast sites' updates


async def test_status_shows_fedbuff_counters_while_it_runs(tmp_path: Path) -> None:
    from fedbus.cli import _status_table

    async with federation(tmp_path) as (_broker, _sites, admin):
        toml = 'name = "fedbuff"\nconcurrency = 3\nbuffer_size = 2\nnum_versions = 8\n'
        job_id = await admin.submit(write_job(tmp_path / "buff", mode="slow", strategy=toml))
        seen: dict = {}
        for _ in range(200):
            status = await admin.status(job_id)
            live = status["jobs"][0].get("live", {}).get("strategy", {})
            if live.get("staleness_hist") and status["jobs"][0]["version"] >= 2:
                seen = status
                break
            await asyncio.sleep(0.1)
        assert seen, "no FedBuff counters while the job ran"
        table = _status_table(seen)
        assert "fedbuff" in table and "staleness histogram" in table and "seconds per version" in table
        assert "accepted=" in table
        await wait_job(admin, job_id, timeout=90)
