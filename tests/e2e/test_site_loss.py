"""A site daemon killed mid-round (SIGKILL, no goodbye): the broker notices within the liveness window,
the round closes with the sites that remain, and the orphaned training script goes away by itself."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from fedbus.admin import Admin
from tests.broker.harness import wait_job, write_job
from tests.e2e.procs import federation

pytestmark = pytest.mark.timeout(180)


def script_pids(workspace: Path) -> list[int]:
    """PIDs of processes whose command line runs a script inside this site's workspace."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "client.py" in cmd and str(workspace) in cmd:
                pids.append(int(entry.name))
    return pids


def test_site_killed_mid_round(tmp_path: Path) -> None:
    job = write_job(tmp_path / "job", mode="hang", min_clients=2, rounds=2)
    with federation(tmp_path, sites=3) as (broker, address, sites):

        async def scenario() -> dict:
            async with Admin(address) as admin:
                job_id = await admin.submit(job)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 60
                while loop.time() < deadline:  # wait until site-3's script is running its first task
                    if (
                        script_pids(tmp_path / "site-3")
                        and (await admin.status(job_id))["jobs"][0]["state"] == "running"
                    ):
                        break
                    await asyncio.sleep(0.2)
                await asyncio.sleep(2.0)
                orphan = script_pids(tmp_path / "site-3")
                assert orphan
                sites[2].proc.send_signal(signal.SIGKILL)
                result = await wait_job(admin, job_id, timeout=90)
                result["orphans"] = orphan
                return result

        result = asyncio.run(scenario())
        assert result["state"] == "finished", result["reason"]
        gone = broker.wait_for("site gone")
        assert gone["site"] == "site-3"
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and any(_alive(p) for p in result["orphans"]):
            time.sleep(0.2)
        assert not any(_alive(p) for p in result["orphans"]), "the orphaned script outlived its site"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
