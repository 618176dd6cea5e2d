"""The store's narrow reads: ``jobs(states)`` filtered in SQLite, ``job_standing`` (what a result's check needs)."""

from __future__ import annotations

from pathlib import Path

from fedbus.broker.registry import held_job_verdict
from fedbus.broker.store import JobStore


def test_jobs_lists_only_the_states_asked_for_in_submission_order(tmp_path: Path) -> None:
    store = JobStore(tmp_path, durability="none")
    try:
        for job_id, state in (("a", "waiting"), ("b", "running"), ("c", "waiting"), ("d", "finished")):
            store.create_job(job_id, job_id, {"model": f"{job_id}.safetensors"}, state=state)
        assert [j["id"] for j in store.jobs(("waiting",))] == ["a", "c"]
        assert [j["id"] for j in store.jobs(("running", "finished"))] == ["b", "d"]
        assert [j["id"] for j in store.jobs()] == ["a", "b", "c", "d"]
        assert store.jobs(()) == []
        assert store.jobs(("waiting",))[0]["spec"] == {"model": "a.safetensors"}
    finally:
        store.close()


def test_job_standing_follows_the_sites_and_state_the_store_holds(tmp_path: Path) -> None:
    store = JobStore(tmp_path, durability="none")
    try:
        assert store.job_standing("nope") is None
        store.create_job("j", "j", {}, state="running")
        assert store.job_standing("j") == {"state": "running", "reason": "", "sites": frozenset()}
        store.set_sites("j", ["s1", "s2"])
        standing = store.job_standing("j")
        assert standing is not None and standing["sites"] == {"s1", "s2"}
        assert held_job_verdict("j", standing, "s1") is None
        assert held_job_verdict("j", standing, "s3") == ("unknown", "job j does not run at site s3")
        store.set_sites("j", ["s3"])  # a changed list is parsed again, not served from the last parse
        assert held_job_verdict("j", store.job_standing("j"), "s3") is None
        store.set_state("j", "finished", "3 rounds done")
        assert held_job_verdict("j", store.job_standing("j"), "s3") == ("ended", "the job finished: 3 rounds done")
        full = store.job("j")
        assert full is not None and (full["state"], full["reason"], full["sites"]) == (
            "finished",
            "3 rounds done",
            ["s3"],
        )
    finally:
        store.close()
