"""The broker SIGKILLed mid-job (twice: inside the first round and later) and started again on the same
workspace: the job resumes from its last checkpoint, the site daemons reconnect by themselves, and the final
FedAvg model is bit for bit the one an uninterrupted run reaches (training is deterministic, and the
uninterrupted result is computed here directly: it cannot depend on timing)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import sqlite3
from pathlib import Path

import pytest
import torch

from fedbus.admin import Admin
from fedbus.modelio import serde
from fedbus.strategy.aggregate import finalize_mean, weighted_sum_into
from tests.broker.harness import wait_job
from tests.e2e.procs import Daemon, start_site
from tests.reliability.jobs import deterministic_job

pytestmark = pytest.mark.timeout(240)
ROUNDS = 4


def _broker(tmp: Path, n: int) -> Daemon:
    cfg = tmp / "broker.toml"
    cfg.write_text("heartbeat_s = 0.5\nliveness = 20\n")
    args = ["broker", "--bind", f"ipc://{tmp}/broker.sock", "--workspace", str(tmp / "broker"), "--config", str(cfg)]
    d = Daemon(args, tmp / f"broker-{n}.log")
    d.wait_for("broker listening")
    return d


def _final(tmp: Path, job_id: str) -> dict[str, torch.Tensor]:
    return serde.read_file(tmp / "broker" / "jobs" / job_id / "models" / f"v{ROUNDS}.safetensors")


def _run(tmp: Path, kills: list[int]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One job; the broker is SIGKILLed when version ``k`` is checkpointed and a little more, for each k."""
    tmp.mkdir()
    job = deterministic_job(tmp / "job", sites=3, rounds=ROUNDS, pause=1.0)
    address = f"ipc://{tmp}/broker.sock"
    brokers = [_broker(tmp, 0)]
    sites = [start_site(tmp, f"site-{i}", address) for i in (1, 2, 3)]
    try:

        async def scenario() -> tuple[str, dict]:
            async with Admin(address, timeout=60) as admin:
                job_id = await admin.submit(job)
            models = tmp / "broker" / "jobs" / job_id / "models"
            for n, version in enumerate(kills, start=1):
                async with asyncio.timeout(90):
                    while not (models / f"v{version}.safetensors").exists():
                        await asyncio.sleep(0.02)
                await asyncio.sleep(0.3)  # inside the next round (about 1 s long): tasks out, results on their way
                brokers[-1].proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(brokers[-1].proc.wait, 10)
                brokers.append(await asyncio.to_thread(_broker, tmp, n))
            async with Admin(address, timeout=60) as admin:
                return job_id, await wait_job(admin, job_id, timeout=150)

        job_id, done = asyncio.run(scenario())
        assert done["state"] == "finished", done["reason"]
        resumed = [d.wait_for("job will resume")["version"] for d in brokers[1:]]
        return _final(tmp, job_id), [str(v) for v in resumed]
    finally:
        for d in [*sites, *brokers]:
            d.stop()


def uninterrupted(start: dict[str, torch.Tensor], rounds: int, sites: int = 3) -> dict[str, torch.Tensor]:
    """The model an uninterrupted run reaches: every round, every site's update (the job script's arithmetic)
    weighted by the site's number and averaged. The updates lie on a 1/64 grid, so their weighted sum is exact
    and the order they arrive in cannot matter: this is the one right answer, bit for bit."""
    model = dict(start)
    for r in range(rounds):  # round r trains from version r (what the broker puts in task.round)
        acc: dict[str, torch.Tensor] = {}
        for k in range(1, sites + 1):
            update = {
                name: (torch.round((torch.sin(w.double() * 0.37 + r) * 8 + k * 0.5 + r) * 64) / 64).to(w.dtype)
                for name, w in model.items()
            }
            weighted_sum_into(acc, update, float(k))
        model = finalize_mean(acc, float(sum(range(1, sites + 1))))
    return model


def test_broker_sigkill_and_restart_reach_the_uninterrupted_model_bit_for_bit(tmp_path: Path) -> None:
    killed, resumed_at = _run(tmp_path / "killed", kills=[0, 2])
    # Each restart picked up the last recorded checkpoint: v0, then v2, or v1 when the kill fell between
    # v2's file landing and its row being recorded (then round 2 is simply done again).
    assert resumed_at[0] == "0" and resumed_at[1] in ("1", "2"), resumed_at
    start = serde.read_file(tmp_path / "killed" / "job" / "model.safetensors")
    reference = uninterrupted(start, ROUNDS)
    assert reference.keys() == killed.keys()
    for name in reference:
        assert reference[name].dtype == killed[name].dtype
        assert torch.equal(reference[name].view(torch.uint8), killed[name].view(torch.uint8)), name
    assert not torch.equal(reference["w"], start["w"])  # the job did train


def test_a_restart_records_updates_of_a_lost_aggregate_as_dropped(tmp_path: Path) -> None:
    """Accepted into a buffer or round the dead broker never checkpointed: dropped with a reason, not counted."""
    from fedbus.broker.store import JobStore

    store = JobStore(tmp_path)
    store.create_job("j", "j", {}, state="running")
    for task, version, staleness in (("a", 0, 0), ("b", 1, 0), ("c", 1, 1), ("d", 2, 0)):
        store.record_update("j", task, "s", version, accepted=True, staleness=staleness, weight=1.0)
    store.record_update("j", "e", "s", -1, accepted=False, reason="stale")
    assert store.unapply_after("j", 2) == 2  # c and d landed in version 3, which was never written
    rows = {u["task_id"]: u for u in store.updates("j")}
    assert [t for t, u in rows.items() if u["accepted"]] == ["a", "b"]
    assert "resumed from version 2" in rows["d"]["reason"] and rows["e"]["reason"] == "stale"
    store.close()


K = 6  # FedBuff buffer: with 3 sites, a version needs two passes of training, so updates wait in the buffer


def _fedbuff_job(folder: Path) -> Path:
    deterministic_job(folder, sites=3, rounds=1, pause=0.4)  # its script and model; the strategy is FedBuff
    (folder / "job.toml").write_text(
        'name = "buff"\nmodel = "model.safetensors"\n\n[strategy]\nname = "fedbuff"\nconcurrency = 3\n'
        f'buffer_size = {K}\nnum_versions = 3\nstaleness = "constant"\n\n[script]\npath = "client.py"\n'
        'args = ["0.4"]\n\n[sites]\nmin = 3\nmax = 3\n'
    )
    return folder


def _waiting(db: Path, job_id: str) -> list[str]:
    """Accepted updates the broker keeps for an aggregate it has not checkpointed yet (read from its store)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        latest = conn.execute("SELECT MAX(version) FROM versions WHERE job_id = ?", (job_id,)).fetchone()[0]
        rows = conn.execute(
            "SELECT task_id FROM updates WHERE job_id = ? AND accepted = 1 AND kept IS NOT NULL "
            "AND version + staleness + 1 > ?",
            (job_id, -1 if latest is None else latest),
        ).fetchall()
    return [r[0] for r in rows]


@pytest.mark.timeout(60)
def test_fedbuff_updates_waiting_in_the_buffer_survive_a_broker_sigkill(tmp_path: Path) -> None:
    """SIGKILLed while its buffer holds accepted updates, the broker started again on the same workspace folds them
    back into its buffer: they stay accepted, none is recorded lost, and the version they complete counts them."""
    job = _fedbuff_job(tmp_path / "job")
    address = f"ipc://{tmp_path}/broker.sock"
    db = tmp_path / "broker" / "fedbus.db"
    brokers = [_broker(tmp_path, 0)]
    sites = [start_site(tmp_path, f"site-{i}", address) for i in (1, 2, 3)]
    try:

        async def scenario() -> tuple[str, list[str], dict]:
            async with Admin(address, timeout=60) as admin:
                job_id = await admin.submit(job)
            async with asyncio.timeout(30):
                while len(waiting := await asyncio.to_thread(_waiting, db, job_id)) < 2:
                    await asyncio.sleep(0.02)
            brokers[-1].proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(brokers[-1].proc.wait, 10)
            brokers.append(await asyncio.to_thread(_broker, tmp_path, 1))
            async with Admin(address, timeout=60) as admin:
                return job_id, waiting, await wait_job(admin, job_id, timeout=40)

        job_id, waiting, done = asyncio.run(scenario())
        assert done["state"] == "finished", done["reason"]
        folded = brokers[1].wait_for("kept updates folded again")
        assert folded["restored"] >= len(waiting) and folded["dropped"] == 0, folded
        assert brokers[1].wait_for("job will resume")["updates_lost_in_aggregate"] == 0
        from fedbus.broker.store import JobStore

        store = JobStore(tmp_path / "broker")
        try:
            rows = {u["task_id"]: u for u in store.updates(job_id)}
            history = store.history(job_id)
        finally:
            store.close()
        assert all(rows[t]["accepted"] for t in waiting), [rows[t] for t in waiting]
        assert not [u for u in rows.values() if "lost" in u["reason"]]
        # Each version counts K updates, and the store's accepted updates landing in it are exactly those K:
        # the updates kept across the kill are among them (accepted at version v with staleness s: lands in v+s+1).
        lands = collections.Counter(u["version"] + u["staleness"] + 1 for u in rows.values() if u["accepted"])
        assert [h["metrics"]["strategy/num_updates"] for h in history[1:]] == [K] * 3
        assert [lands[v] for v in (1, 2, 3)] == [K] * 3, lands
        assert not list((tmp_path / "broker" / "jobs" / job_id / "kept").glob("*"))  # released at the end
    finally:
        for d in [*sites, *brokers]:
            d.stop()


def test_kept_updates_stay_accepted_while_their_file_exists_and_go_once_covered(tmp_path: Path) -> None:
    from fedbus.broker.store import JobStore

    store = JobStore(tmp_path)
    store.create_job("j", "j", {}, state="running")
    files = {t: tmp_path / f"{t}.safetensors" for t in "abc"}
    for t in "ab":
        files[t].write_bytes(b"x")
    for task, version, staleness in (("a", 2, 0), ("b", 2, 1), ("c", 2, 0)):
        kept = {"path": str(files[task]), "params_type": "DIFF", "weight": 1.0, "metrics": {}}
        store.record_update("j", task, "s", version, accepted=True, staleness=staleness, weight=1.0, kept=kept)
    assert store.unapply_after("j", 2) == 1  # c's file is gone: lost, with the reason; a and b wait to be refolded
    assert [r["task_id"] for r in store.kept_updates("j", 2)] == ["a", "b"]
    assert store.release_covered("j", 3) == 1 and not files["a"].exists() and files["b"].exists()  # a is in v3
    assert [r["task_id"] for r in store.kept_updates("j", 2)] == ["b"]
    store.release_covered("j")  # the job ended
    assert not files["b"].exists() and all(u["accepted"] for u in store.updates("j") if u["task_id"] != "c")
    store.close()


def test_small_kept_updates_share_one_log_per_version_they_land_in(tmp_path: Path) -> None:
    from fedbus.broker.store import JobStore
    from fedbus.modelio import serde
    from fedbus.modelio.spool import open_params

    store = JobStore(tmp_path)
    store.create_job("j", "j", {}, state="running")
    updates = {
        t: {"w": torch.randn(37), "n": torch.arange(5, dtype=torch.int16) + i, "h": torch.randn(3, 3).half()}
        for i, t in enumerate("abc")
    }
    lands = {"a": 3, "b": 3, "c": 4}
    kept = {t: store.keep_small("j", lands[t], serde.layout(updates[t]).parts) for t in "abc"}
    assert kept["a"]["path"] == kept["b"]["path"] != kept["c"]["path"]
    assert kept["b"]["offset"] >= kept["a"]["offset"] + kept["a"]["length"] and kept["b"]["offset"] % 64 == 0
    for t in "abc":
        at = {"offset": kept[t]["offset"], "length": kept[t]["length"]}
        params = open_params(kept[t]["path"], max_total=1 << 20, **at)
        try:
            assert sorted(params) == ["h", "n", "w"]
            assert all(torch.equal(params[k], updates[t][k]) for k in updates[t])
        finally:
            params.release()
        store.record_update("j", t, "s", lands[t] - 1, accepted=True, staleness=0, weight=1.0, kept=kept[t])
    assert [r["task_id"] for r in store.kept_updates("j", 2)] == ["a", "b", "c"]
    assert store.release_covered("j", 3) == 2  # a and b are in checkpoint 3: their log goes
    assert not Path(kept["a"]["path"]).exists() and Path(kept["c"]["path"]).exists()
    assert [r["task_id"] for r in store.kept_updates("j", 3)] == ["c"]
    more = store.keep_small("j", 4, serde.layout(updates["a"]).parts)  # the open log of version 4 takes more
    assert more["path"] == kept["c"]["path"] and more["offset"] > kept["c"]["offset"]
    store.release_covered("j")  # the job ended
    assert not Path(kept["c"]["path"]).exists()
    store.close()


def test_a_checkpoint_reads_only_the_kept_updates_not_every_update_ever_recorded(tmp_path: Path) -> None:
    # Each checkpoint releases the updates it covers. Over all updates that was a scan of the whole table
    # (43 ms per checkpoint at 100,000 updates, growing); through the partial index it reads the kept ones.
    from fedbus.broker.store import JobStore

    store = JobStore(tmp_path)
    queries = [
        "SELECT kept FROM updates WHERE job_id = ? AND kept IS NOT NULL AND version <= ?",
        "UPDATE updates SET kept = NULL WHERE job_id = ? AND kept IS NOT NULL AND version <= ?",
        "SELECT rowid FROM updates WHERE job_id = ? AND accepted = 1 AND kept IS NOT NULL AND version > ?",
    ]
    for query in queries:
        plan = " ".join(str(row[-1]) for row in store.db.execute(f"EXPLAIN QUERY PLAN {query}", ("j", 3)))
        assert "USING INDEX updates_kept" in plan, (query, plan)
    store.db.execute("DROP INDEX updates_kept")  # a workspace from before the index...
    store.close()
    reopened = JobStore(tmp_path)  # ...gets it on open
    assert reopened.db.execute("SELECT name FROM sqlite_master WHERE name = 'updates_kept'").fetchone()
    reopened.close()


def test_a_version_is_dated_when_published_not_when_its_checkpoint_landed(tmp_path: Path) -> None:
    from fedbus.broker.store import JobStore

    store = JobStore(tmp_path)
    store.create_job("j", "j", {}, state="running")
    path = store.write_checkpoint("j", 1, {"w": torch.zeros(3)})
    store.add_version("j", 1, path, {}, published=1000.5)  # the write took its time; the history does not care
    store.add_version("j", 2, path, {})
    times = [h["time"] for h in store.history("j")]
    assert times[0] == 1000.5 and times[1] > 1000.5
    store.close()


async def test_updates_recorded_in_one_loop_turn_commit_together_before_their_sites_hear(tmp_path: Path) -> None:
    # One commit per loop turn, not per update; an update's ack waits for its commit and the sync of the WAL
    # that makes it durable, and any other write (which may delete files the batch's rows name) commits the
    # batch first.
    from fedbus.broker.store import JobStore

    store = JobStore(tmp_path)
    store.create_job("j", "j", {}, state="running")
    other = sqlite3.connect(tmp_path / "fedbus.db")  # what a restarted broker would read
    committed = lambda: other.execute("SELECT COUNT(*) FROM updates").fetchone()[0]  # noqa: E731
    heard: list[str] = []
    for task in "ab":
        store.record_update("j", task, "s", 1, accepted=True, staleness=0, weight=1.0)
        store.when_recorded(lambda task=task: heard.append(task))
    assert committed() == 0 and heard == [] and len(store.updates("j")) == 2  # visible to the broker itself
    await asyncio.sleep(0)  # the turn ends: committed, and its sync under way in a worker thread
    assert committed() == 2
    await store.synced()
    assert heard == ["a", "b"]
    store.when_recorded(lambda: heard.append("nothing waits"))  # nothing open or unsynced: at once
    store.record_update("j", "c", "s", 1, accepted=False, reason="late")
    store.when_recorded(lambda: heard.append("c"))
    store.set_state("j", "finished")  # another write: the batch is committed first
    assert committed() == 3 and heard == ["a", "b", "nothing waits"]
    await store.synced()
    assert heard == ["a", "b", "nothing waits", "c"]
    other.close()
    store.close()

    def tool() -> int:  # no event loop in this thread (tools, restores): every record commits at once
        outside = JobStore(tmp_path)
        outside.record_update("j", "d", "s", 1, accepted=True)
        count = sqlite3.connect(tmp_path / "fedbus.db").execute("SELECT COUNT(*) FROM updates").fetchone()[0]
        outside.close()
        return count

    assert await asyncio.to_thread(tool) == 4
