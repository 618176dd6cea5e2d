"""Site faults with real processes: a site SIGKILLed mid-upload comes back and resumes its stream where
the broker had verified it; a hung training script is stopped at the task timeout and the round goes on."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import torch

from fedbus.admin import Admin
from fedbus.modelio import serde
from fedbus.transport.streams import DEFAULT_CHUNK
from tests.broker.harness import wait_job, write_job
from tests.e2e.procs import Daemon, start_broker, start_site
from tests.reliability.jobs import deterministic_job

pytestmark = pytest.mark.timeout(150)

DYING_SITE = [sys.executable, "-m", "tests.reliability.dying_site"]


def _broker_config(tmp: Path, **keys: object) -> str:
    path = tmp / "broker.toml"
    path.write_text("".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in keys.items()))
    return str(path)


def test_site_killed_mid_upload_resumes_its_stream(tmp_path: Path) -> None:
    job = deterministic_job(tmp_path / "job", sites=2, rounds=1, numel=6 << 20)  # 24 MiB: twelve 2 MiB chunks
    cfg = _broker_config(tmp_path, heartbeat_s=0.5, liveness=30)  # back within 15 s: still the same site
    broker, address = start_broker(tmp_path, "--config", cfg)
    site1 = start_site(tmp_path, "site-1", address)
    args = ["--name", "site-2", "--broker", address, "--workspace", str(tmp_path / "site-2")]
    dying = Daemon(["2", *args], tmp_path / "site-2-first.log", command=DYING_SITE)
    revived = None
    try:

        async def scenario() -> tuple[dict, dict]:
            async with Admin(address) as admin:
                job_id = await admin.submit(job)
                assert await asyncio.to_thread(dying.proc.wait, 90) == -9  # killed two chunks into its upload
                nonlocal revived
                revived = Daemon(["site", *args], tmp_path / "site-2-again.log")
                done = await wait_job(admin, job_id, timeout=90)
                return done, await admin.download(job_id, tmp_path / "out")

        done, data = asyncio.run(scenario())
        assert done["state"] == "finished", done["reason"]
        resumed = broker.wait_for("stream resumed by its sender")
        assert resumed["offset"] >= 2 * DEFAULT_CHUNK, resumed  # not from zero: from what had been verified
        assert revived is not None
        delivered = revived.wait_for("interrupted upload delivered")
        assert delivered["task_id"].startswith("0-site-2-")
        accepted = {(u["task_id"], u["accepted"]) for u in data["updates"]}
        assert (delivered["task_id"], 1) in accepted  # the resumed update counted in round 1
        assert [h["version"] for h in data["history"]] == [0, 1]
        assert not list((tmp_path / "site-2" / "jobs").glob("*/uploads/*")), "a settled upload left files"
    finally:
        for d in [site1, dying, *([revived] if revived else []), broker]:
            d.stop()


def test_a_site_restarted_within_the_liveness_window_gets_its_task_again(tmp_path: Path) -> None:
    """site-2's daemon is SIGKILLed while its script trains, and a new one starts before the broker could
    declare it gone: the round's task died with the old process, and the broker sends it again (it waited
    for an answer that could never come, with no round timeout, for ever)."""
    job = deterministic_job(tmp_path / "job", sites=2, rounds=2, pause=3.0)  # each script trains for 3 s
    cfg = _broker_config(tmp_path, heartbeat_s=0.5, liveness=60)  # back within 30 s: still the same site
    broker, address = start_broker(tmp_path, "--config", cfg)
    site1 = start_site(tmp_path, "site-1", address)
    first = start_site(tmp_path, "site-2", address)
    args = ["site", "--name", "site-2", "--broker", address, "--workspace", str(tmp_path / "site-2")]
    again = None
    try:

        async def scenario() -> tuple[dict, dict]:
            async with Admin(address) as admin:
                job_id = await admin.submit(job)
                handed = await asyncio.to_thread(first.wait_for, "task handed to the script", 60)
                assert handed["round"] == 0
                first.proc.kill()  # mid-training: no bye, nothing kept
                assert await asyncio.to_thread(first.proc.wait, 10) == -9
                nonlocal again
                again = Daemon(args, tmp_path / "site-2-again.log")
                done = await wait_job(admin, job_id, timeout=90)
                return done, await admin.download(job_id, tmp_path / "out")

        done, data = asyncio.run(scenario())
        assert done["state"] == "finished", done["reason"]
        registered = [r for r in broker.lines if r.get("event") == "site registered" and r["site"] == "site-2"]
        assert [r["arrival"] for r in registered] == ["new", "restarted"]
        again_sent = broker.wait_for("task sent again: the site restarted without it")
        assert again_sent["site"] == "site-2" and again_sent["task"] == handed_task(first)
        accepted = {(u["task_id"], u["site"]) for u in data["updates"] if u["accepted"]}
        assert (again_sent["task"], "site-2") in accepted  # the same task, answered by the new process
        assert [h["version"] for h in data["history"]] == [0, 1, 2]
        assert not any(r.get("event") == "site gone" for r in broker.lines)
    finally:
        for d in [site1, first, *([again] if again else []), broker]:
            d.stop()


def handed_task(site: Daemon) -> str:
    return next(r["task_id"] for r in site.lines if r.get("event") == "task handed to the script")


def test_a_hung_script_is_stopped_at_the_task_timeout(tmp_path: Path) -> None:
    """site-3's script hangs in training; the job's task_timeout_s stops it and FedAvg finishes with 2 of 3."""
    job = write_job(tmp_path / "job", mode="hang", min_clients=2, rounds=1)
    with open(job / "job.toml", "a") as f:
        f.write("\n[limits]\ntask_timeout_s = 10.0\n")
    broker, address = start_broker(tmp_path)
    sites = [start_site(tmp_path, f"site-{i}", address) for i in (1, 2, 3)]
    try:

        async def scenario() -> dict:
            async with Admin(address) as admin:
                return await wait_job(admin, await admin.submit(job), timeout=60)

        done = asyncio.run(scenario())
        assert done["state"] == "finished", done["reason"]
        timed_out = sites[2].wait_for("task timed out: killing the script")
        assert timed_out["task_id"].startswith("0-site-3-")
        ended = broker.wait_for("script ended")
        assert ended["site"] == "site-3" and ended["outcome"] == "crashed"
        final = serde.read_file(next((tmp_path / "broker").glob("jobs/*/models/v1.safetensors")))
        assert torch.equal(final["w"], torch.ones(10))  # the mean of the two sites that answered
    finally:
        for d in [*sites, broker]:
            d.stop()
