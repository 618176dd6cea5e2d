"""A workspace that refuses writes (full, failing): nothing accepted is lost, the job pauses and says why, and it
resumes by itself once the disk takes writes again.

The retry schedule and the fault registry are pure and tested without IO; the store and a whole federation are
tested on a real tmpfs, filled and emptied (root only: skipped with the reason elsewhere)."""

from __future__ import annotations

import asyncio
import errno
import socket
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from fedbus.admin import Admin
from fedbus.broker.faults import STORE, Backoff, Faults, checkpoint_key, errno_of
from fedbus.modelio import serde
from tests.broker.harness import wait_job
from tests.e2e.procs import Daemon, start_site
from tests.reliability.jobs import deterministic_job
from tests.reliability.mounts import fill, kept_full, small_tmpfs
from tests.reliability.test_broker_restart import uninterrupted

# --- pure: the retry schedule and the registry --------------------------------------------------------------


def test_backoff_doubles_from_its_first_delay_up_to_its_cap_and_starts_again_after_a_success() -> None:
    b = Backoff(first=0.05, cap=0.4)
    assert [b.next() for _ in range(6)] == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]
    assert b.attempts == 6
    b.reset()
    assert b.next() == 0.05
    with pytest.raises(ValueError, match="first <= cap"):
        Backoff(first=1.0, cap=0.5)


def test_a_fault_counts_its_attempts_and_pauses_its_job_or_every_job_when_it_is_the_store() -> None:
    faults = Faults()
    full = OSError(errno.ENOSPC, "No space left on device")
    assert not faults and faults.holding("a") is None
    first = faults.failed(checkpoint_key("a"), "checkpoint of version 3", "/ws/jobs/a/models/v3", full, "a", 100.0)
    again = faults.failed(checkpoint_key("a"), "checkpoint of version 3", "/ws/jobs/a/models/v3", full, "a", 101.0)
    assert (first.attempts, again.attempts, again.since) == (1, 2, 100.0)  # the fault dates from its first failure
    assert faults.holding("a") is again and faults.holding("b") is None  # a checkpoint pauses its own job
    line = again.describe(now=102.5)
    assert "checkpoint of version 3 at /ws/jobs/a/models/v3" in line and "(ENOSPC)" in line
    assert "for 2.5 s, 2 attempts, retrying" in line
    store = faults.failed(STORE, "the job store", "/ws/fedbus.db", sqlite3.OperationalError("disk I/O error"), None, 5)
    assert faults.holding("b") is store  # the store holds every job's rows
    assert faults.holding("a") is again  # a job's own fault is the one it shows
    assert faults.cleared(checkpoint_key("a")) is again and faults.holding("a") is store
    assert faults.cleared(STORE) is store and not faults and faults.failures == 3
    assert faults.cleared(STORE) is None


def test_the_errno_of_a_failed_write_is_the_systems_or_the_one_a_sqlite_code_stands_for() -> None:
    assert errno_of(OSError(errno.EROFS, "Read-only file system")) == errno.EROFS
    assert errno_of(sqlite3.OperationalError("database or disk is full")) == errno.ENOSPC
    assert errno_of(sqlite3.OperationalError("attempt to write a readonly database")) == errno.EROFS
    assert errno_of(sqlite3.OperationalError("disk I/O error")) == errno.EIO
    try:
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as wrapped:
        assert errno_of(wrapped) == errno.EIO
    assert errno_of(ValueError("no errno")) is None


# --- the store on a full tmpfs ---------------------------------------------------------------------------------


async def test_a_commit_the_full_disk_refuses_keeps_its_writes_and_acknowledges_them_once_they_land(
    tmp_path: Path,
) -> None:
    from fedbus.broker.store import JobStore

    with small_tmpfs(tmp_path / "ws", "2m") as ws:
        store = JobStore(ws)
        store.create_job("j", "j", {}, state="running")
        heard: list[str] = []
        blob = fill(ws / "fill")
        assert blob > 0
        reason = "x" * 2000  # rows that need new pages in the WAL, which the full disk cannot give
        for i in range(400):
            store.record_update("j", f"t{i}", "s", 1, accepted=True, staleness=0, weight=1.0, reason=reason)
        store.when_recorded(lambda: heard.append("acked"))
        await asyncio.sleep(0)  # the turn ends: its commit fails
        fault = store.faults.get(STORE)
        assert fault is not None and fault.errno == errno.ENOSPC, fault
        assert heard == []  # not acknowledged: not on disk
        store.record_update("j", "late", "s", 1, accepted=True, staleness=0, weight=1.0)  # kept meanwhile
        store.when_recorded(lambda: heard.append("late acked"))
        with pytest.raises(OSError, match="workspace write failing"):
            store.create_job("k", "k", {})  # a new job is refused with the reason, not kept
        (ws / "fill").unlink()
        async with asyncio.timeout(10):
            while store.faults.get(STORE) is not None:
                await asyncio.sleep(0.02)
        assert heard == ["acked", "late acked"]
        tasks = [u["task_id"] for u in store.updates("j")]
        assert tasks == [*(f"t{i}" for i in range(400)), "late"] and store.job("k") is None
        store.close()
        with sqlite3.connect(ws / "fedbus.db") as other:  # what a restarted broker reads
            assert other.execute("SELECT COUNT(*) FROM updates").fetchone()[0] == 401


async def test_a_failed_wal_sync_is_not_trusted_again_the_store_checkpoints_before_acknowledging(
    tmp_path: Path,
) -> None:
    # After a failed fsync the kernel may have dropped the pages and report the next fsync clean: the store makes
    # its log durable by a full checkpoint instead, and only then acknowledges.
    from fedbus.broker.store import JobStore

    store = JobStore(tmp_path)
    store.create_job("j", "j", {}, state="running")
    await store.synced()
    real, calls = store.commits._fsync_wal, []

    def failing() -> None:
        calls.append("fsync")
        raise OSError(errno.EIO, "Input/output error")

    store.commits._fsync_wal = failing  # type: ignore[method-assign]
    heard: list[str] = []
    store.record_update("j", "a", "s", 1, accepted=True, staleness=0, weight=1.0)
    store.when_recorded(lambda: heard.append("a"))
    async with asyncio.timeout(10):
        while store.faults.get(STORE) is None:
            await asyncio.sleep(0.01)
    fault = store.faults.get(STORE)
    assert fault is not None and fault.errno == errno.EIO and heard == []
    async with asyncio.timeout(10):
        while store.faults.get(STORE) is not None:
            await asyncio.sleep(0.01)
    assert heard == ["a"] and calls == ["fsync"]  # the retry checkpointed; it did not call fsync again
    store.commits._fsync_wal = real  # type: ignore[method-assign]
    store.record_update("j", "b", "s", 1, accepted=True, staleness=0, weight=1.0)
    await store.recorded()
    assert [u["task_id"] for u in store.updates("j")] == ["a", "b"]
    store.close()


# --- a whole federation on a full tmpfs --------------------------------------------------------------------------

ROUNDS = 6
SITES = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.timeout(115)
def test_a_workspace_full_mid_job_pauses_it_with_the_reason_and_the_job_ends_complete(tmp_path: Path) -> None:
    job = deterministic_job(tmp_path / "job", sites=SITES, rounds=ROUNDS, pause=0.3)
    port = _free_port()
    cfg = tmp_path / "broker.toml"
    cfg.write_text(f"heartbeat_s = 0.5\nliveness = 20\nmetrics_port = {port}\n")
    address = f"ipc://{tmp_path}/broker.sock"
    with small_tmpfs(tmp_path / "ws", "12m") as ws:
        broker = Daemon(
            ["broker", "--bind", address, "--workspace", str(ws / "broker"), "--config", str(cfg)],
            tmp_path / "broker.log",
        )
        sites: list[Daemon] = []
        try:
            broker.wait_for("broker listening")
            sites = [start_site(tmp_path, f"site-{i}", address) for i in range(1, SITES + 1)]

            async def scenario() -> tuple[str, dict, dict, tuple[int, str], tuple[int, str]]:
                async with Admin(address, timeout=30) as admin:
                    job_id = await admin.submit(job)
                    models = ws / "broker" / "jobs" / job_id / "models"
                    async with asyncio.timeout(60):  # the sites and their scripts start (slow on a loaded host)
                        while not (models / "v2.safetensors").exists():
                            await asyncio.sleep(0.02)
                    with kept_full(ws):  # version 3's round is under way
                        async with asyncio.timeout(20):
                            while (paused := (await admin.status(job_id))["jobs"][0])["state"] != "paused":
                                await asyncio.sleep(0.05)
                        sick = await asyncio.to_thread(_healthz, port)
                        await asyncio.sleep(1.5)  # the disk stays full a while: the job stays paused
                        held = (await admin.status(job_id))["jobs"][0]
                    done = await wait_job(admin, job_id, timeout=45)
                    healthy = await asyncio.to_thread(_healthz, port)
                    assert held["state"] == "paused", held
                    return job_id, paused, done, sick, healthy

            job_id, paused, done, sick, healthy = asyncio.run(scenario())
        finally:
            for d in [*sites, broker]:
                d.stop()

        assert done["state"] == "finished", done["reason"]
        assert "workspace write failing" in paused["reason"] and "ENOSPC" in paused["reason"], paused
        assert sick[0] == 503 and "ENOSPC" in sick[1], sick
        assert healthy == (200, "ok\n")
        failed = [r for r in broker.lines if r.get("level") == "error" and "write failed" in r.get("event", "")]
        assert failed and all(r.get("errno") == "ENOSPC" and r.get("path") for r in failed), failed
        assert all(r.get("job") == job_id for r in failed if "checkpoint" in r["event"]), failed

        # Nothing the broker accepted was lost: every version, every update, every checkpoint, the exact model.
        from fedbus.broker.store import JobStore

        store = JobStore(ws / "broker")
        try:
            assert [h["version"] for h in store.history(job_id)] == list(range(ROUNDS + 1))
            updates = store.updates(job_id)
            assert len(updates) == SITES * ROUNDS and all(u["accepted"] for u in updates), updates
            for v in range(ROUNDS + 1):
                assert store.checkpoint_path(job_id, v).is_file(), v
            final = serde.read_file(store.checkpoint_path(job_id, ROUNDS))
        finally:
            store.close()
        reference = uninterrupted(serde.read_file(job / "model.safetensors"), ROUNDS, SITES)
        for name, tensor in reference.items():
            assert torch.equal(tensor, final[name]), name
        for site in sites:  # every upload was acknowledged: no site waited out its stall timeout for one
            lost = [r for r in site.lines if "lost" in r.get("event", "")]
            assert not lost, lost
