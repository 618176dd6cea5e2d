"""Sites and broker agree on what runs: a broker started again without the job its sites run (its workspace
replaced) tells them to end it, and they stop the script, say so in their log and audit, and forget the uploads
they kept of it. A real site daemon and script; the verdict itself (known and ended vs never known) is checked
without IO."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from fedbus.admin import Admin
from fedbus.broker import Broker
from fedbus.broker.registry import held_job_verdict
from fedbus.config import BrokerConfig
from tests.e2e.procs import Daemon, start_site
from tests.reliability.jobs import deterministic_job

pytestmark = pytest.mark.timeout(150)  # generous: process starts on a loaded machine


def _line(d: Daemon, event: str, timeout: float = 30.0, **fields: object) -> dict:
    """The first log line of ``event`` whose fields hold ``fields``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rec in list(d.lines):
            if rec.get("event") == event and all(rec.get(k) == v for k, v in fields.items()):
                return rec
        time.sleep(0.05)
    raise AssertionError(f"no {event!r} {fields} in {d.log_path}: {d.log_path.read_text()[-2000:]}")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _audit(site_dir: Path) -> list[dict]:
    path = site_dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


async def test_a_broker_without_the_job_its_site_runs_makes_it_end_it(tmp_path: Path) -> None:
    """The brokers run in this process (one after the other on one address: the second with a workspace of its
    own, as a replaced workspace is); the site and its script are real processes."""
    job = deterministic_job(tmp_path / "job", sites=1, rounds=2, pause=120.0)  # the script sits in training
    address = f"ipc://{tmp_path}/broker.sock"
    # The site also keeps an upload of a job no broker ever ran (a killed site's leftover): dropped at its hello.
    leftover = tmp_path / "site-1" / "jobs" / "old-0badc0de" / "uploads"
    leftover.mkdir(parents=True)
    (leftover / "t1.result").write_bytes(b"x")
    (leftover / "t1.safetensors").write_bytes(b"x")

    def config(workspace: str) -> BrokerConfig:
        return BrokerConfig(bind=address, workspace=str(tmp_path / workspace), heartbeat_s=0.5, liveness=6)

    site = start_site(tmp_path, "site-1", address)
    try:
        async with Broker(config("broker-a")) as first:
            await asyncio.to_thread(_line, site, "job dropped", 60, job="old-0badc0de")
            assert not leftover.exists()
            async with Admin(address, timeout=30) as admin:
                job_id = await admin.submit(job)
            pid = (await asyncio.to_thread(_line, site, "script started", 60, job=job_id))["pid"]
            assert first.store.job(job_id) is not None
        async with Broker(config("broker-b")) as second:  # the same address, a workspace without the job
            rec = await asyncio.to_thread(_line, site, "the broker does not run this job here: dropping it", job=job_id)
            assert rec["cause"] == "unknown" and rec["script_running"], rec
            await asyncio.to_thread(_line, site, "job dropped", job=job_id)
            async with asyncio.timeout(20):
                while not _gone(pid):
                    await asyncio.sleep(0.05)
            dropped = {r["job"]: r for r in _audit(tmp_path / "site-1") if r.get("kind") == "job_dropped"}
            assert dropped[job_id]["cause"] == dropped["old-0badc0de"]["cause"] == "unknown", dropped
            assert not (tmp_path / "site-1" / "jobs" / job_id / "uploads").exists()
            second.guard.audit.flush()
        # The dropped job's end is not reported to a broker that never knew it: nothing was refused there.
        assert not [r for r in _audit(tmp_path / "broker-b") if r.get("kind") == "refused"]
    finally:
        site.stop()


def test_the_broker_ends_only_what_its_store_says_does_not_run_at_the_site() -> None:
    assert held_job_verdict("j", None, "a") == ("unknown", "the broker has no record of job j")
    finished = {"state": "finished", "reason": "3 rounds done", "sites": ["a"]}
    assert held_job_verdict("j", finished, "a") == ("ended", "the job finished: 3 rounds done")
    running = {"state": "running", "reason": "", "sites": ["a", "b"]}
    assert held_job_verdict("j", running, "a") is None
    cause, reason = held_job_verdict("j", running, "c") or ("", "")
    assert cause == "unknown" and "does not run at site c" in reason
    # Waiting to start again after a restart (no controller yet): the broker will run it, the site keeps it.
    assert held_job_verdict("j", {"state": "waiting", "reason": "", "sites": ["a"]}, "a") is None
    assert held_job_verdict("j", {"state": "waiting", "reason": "", "sites": []}, "a") is None
