"""A site drops a job the broker does not run there (``end_job`` with a cause), on the word of the broker session
that welcomed it only: a verdict of another session is ignored, the script runs on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import psutil
import pytest

from fedbus.protocol.messages import Deploy, EndJob, Error
from tests.site.helpers import FakeBroker, job_archive, running_site

pytestmark = pytest.mark.timeout(60)
SLEEPER = "import time\ntime.sleep(60)\n"


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _until(pred: object, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def test_a_site_drops_a_job_on_the_word_of_the_broker_that_welcomed_it_only(
    tmp_path: Path, broker: FakeBroker
) -> None:
    archive = job_archive(tmp_path / "job", SLEEPER)
    async with running_site(tmp_path / "ws", broker.address) as site:
        await broker.wait_hellos(1)
        for job_id in ("j1", "j2"):
            await broker.send(Deploy(job_id=job_id, script="client.py", args=[]), [archive])
        pids = {}
        for _ in range(2):
            started = await broker.expect("job_event", event="started")
            pids[started.job_id] = started.data["pid"]
        kept = site.workspace / "jobs" / "j1" / "uploads"
        kept.mkdir()
        (kept / "t-0.result").write_bytes(b"x")  # an upload kept for resuming: of no use once the job is dropped

        # A verdict of another broker session (one the site no longer talks to) changes nothing ...
        await broker.send(EndJob("j1", "no record of j1", cause="unknown", session="broker-0"))
        await asyncio.sleep(0.3)  # the site says hello again at most every 0.2 s: this one draws a new hello
        await broker.send(Error("hello_required", "say hello first", "heartbeat"))
        await broker.wait_hellos(2)  # messages are handled in order: the stale verdict was seen before this
        assert "j1" in site.runners and not _gone(pids["j1"]) and kept.exists()
        assert broker.last_hello is not None and broker.last_hello.jobs == ["j1", "j2"]  # what it runs, in its hello
        # ... and a cause this site does not know is refused.
        await broker.send(EndJob("j1", "?", cause="misplaced", session="broker-1"))
        refused = await broker.expect("error", ref="end_job")
        assert "cause" in refused.reason and "j1" in site.runners

        # The broker that welcomed it never knew j1: the script stops at once, the kept upload goes, no event.
        await broker.send(EndJob("j1", "no record of j1", cause="unknown", session="broker-1"))
        await _until(lambda: "j1" not in site.runners and _gone(pids["j1"]) and not kept.exists())
        # j2 ended at the broker while the site was away: stopped too, and its end reported as usual.
        await broker.send(EndJob("j2", "the job finished", cause="ended", session="broker-1"))
        exited = await broker.expect("job_event", event="exited")
        assert exited.job_id == "j2" and _gone(pids["j2"])
        await _until(lambda: not site.runners)
        audit = [json.loads(line) for line in (site.workspace / "audit.jsonl").read_text().splitlines()]
        assert [(r["job"], r["cause"]) for r in audit if r["kind"] == "job_dropped"] == [
            ("j1", "unknown"),
            ("j2", "ended"),
        ]
        assert not [m for m in _drain(broker) if m.TYPE == "job_event" and m.job_id == "j1" and m.event != "started"]


def _drain(broker: FakeBroker) -> list:
    out = []
    while not broker.inbox.empty():
        out.append(broker.inbox.get_nowait().msg)
    return out
