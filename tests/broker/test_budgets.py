"""Byte budgets of stored job events, without sockets: what is charged, what is refused, how refusals are told."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedbus.audit import read_audit
from fedbus.broker.budgets import EVENTS, LOGS, ByteBudgets, Limits
from fedbus.broker.guard import Guard
from fedbus.broker.metrics import Metrics
from fedbus.broker.outbox import Outbox
from fedbus.broker.registry import Registry
from fedbus.broker.store import JobStore
from fedbus.broker.store_gate import StoreGate, budgets_of, size_floor, stored_size
from fedbus.config import BrokerConfig
from fedbus.protocol.messages import JobEvent


def budgets(per_site: int = 100, per_job: int = 250, max_record: int = 40, burst_s: float = 10.0) -> ByteBudgets:
    return ByteBudgets({EVENTS: Limits(per_site, per_job), LOGS: Limits(30, 1000)}, max_record, burst_s)


def test_records_are_charged_until_the_site_budget_then_refused() -> None:
    b = budgets()
    for _ in range(3):
        assert b.charge("j", "a", EVENTS, 30, now=0.0) is None
    refusal = b.charge("j", "a", EVENTS, 30, now=0.0)
    assert refusal is not None and "site 'a' is over its events budget of 100 bytes" in refusal.reason
    assert b.used("j", EVENTS, "a") == 90  # a refused record charges nothing
    assert b.charge("j", "a", EVENTS, 10, now=0.0) is None  # one that still fits does
    assert b.used("j", EVENTS, "a") == 100
    assert b.used("j", LOGS, "a") == 0  # classes are apart


def test_the_job_budget_bounds_all_its_sites_together() -> None:
    b = budgets(per_site=130)
    for site in ("a", "b"):
        for _ in range(3):
            assert b.charge("j", site, EVENTS, 40, now=0.0) is None
    assert b.used("j", EVENTS) == 240
    refusal = b.charge("j", "c", EVENTS, 20, now=0.0)
    assert refusal is not None and "job 'j' is over its events budget of 250 bytes" in refusal.reason
    assert b.charge("k", "c", EVENTS, 20, now=0.0) is None  # another job has its own
    assert b.used("j", EVENTS) == 240


def test_a_record_over_the_cap_is_refused_whatever_the_budget() -> None:
    b = budgets()
    refusal = b.charge("j", "a", EVENTS, 41, now=0.0)
    assert refusal is not None and "over the broker's cap of 40 bytes" in refusal.reason
    assert b.used("j", EVENTS) == 0


def test_seeded_bytes_count_as_charged() -> None:
    b = budgets()
    assert not b.seeded("j")
    b.seed("j", EVENTS, {"a": 95, "b": 10})
    assert b.seeded("j")
    assert b.used("j", EVENTS) == 105
    assert b.charge("j", "a", EVENTS, 10, now=0.0) is not None
    assert b.charge("j", "b", EVENTS, 10, now=0.0) is None


def test_the_site_is_told_once_and_refusals_are_logged_once_per_burst_with_a_count() -> None:
    b = budgets(per_site=10, burst_s=5.0)
    assert b.charge("j", "a", EVENTS, 10, now=0.0) is None
    first = b.charge("j", "a", EVENTS, 10, now=1.0)
    assert first is not None and first.tell and first.log and first.count == 1
    quiet = [b.charge("j", "a", EVENTS, 10, now=1.0 + i * 0.1) for i in range(1, 31)]
    assert all(r is not None and not r.tell and not r.log for r in quiet)
    later = b.charge("j", "a", EVENTS, 10, now=6.5)  # the burst is over: logged with what it counted
    assert later is not None and later.log and not later.tell and later.count == 31
    again = b.charge("j", "a", EVENTS, 10, now=6.6)
    assert again is not None and not again.log and again.count == 1


def test_another_class_or_site_is_told_on_its_own() -> None:
    b = budgets(per_site=10)
    b.charge("j", "a", EVENTS, 10, now=0.0)
    b.charge("j", "a", LOGS, 30, now=0.0)
    assert b.charge("j", "a", EVENTS, 10, now=0.0).tell  # type: ignore[union-attr]
    logs = b.charge("j", "a", LOGS, 1, now=0.1)
    assert logs is not None and logs.tell and logs.log  # a new kind of refusal is told and logged at once
    b.charge("j", "b", EVENTS, 10, now=0.0)
    assert b.charge("j", "b", EVENTS, 10, now=0.2).tell  # type: ignore[union-attr]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown byte budget classes"):
        ByteBudgets({"models": Limits(1, 1)}, 1)
    with pytest.raises(ValueError, match="positive"):
        ByteBudgets({EVENTS: Limits(1, 1)}, 0)


def test_stored_size_is_what_the_store_writes() -> None:
    kind, size = stored_size(JobEvent("j", "log_text", data={"lines": ["ab", "cde"], "dropped": 0}))
    assert (kind, size) == (LOGS, 7)
    assert stored_size(JobEvent("j", "log_text", data={"lines": "not a list"})) == (LOGS, 0)
    kind, size = stored_size(JobEvent("j", "log", data={"key": "loss", "value": 1.5}))
    assert kind == EVENTS and size == len('{"code": 0, "detail": "", "key": "loss", "value": 1.5}')
    kind, size = stored_size(JobEvent("j", "crashed", detail="x" * 5000))
    assert size < 2100  # the detail is cut as the store cuts it
    with pytest.raises(ValueError, match="cannot be stored"):
        stored_size(JobEvent("j", "log", data={b"k": 1}))


def test_the_profile_sets_the_budgets() -> None:
    b = budgets_of(BrokerConfig(event_record_kb=2, events_mb_per_site=1, events_mb_per_job=3, logs_mb_per_site=0.5))
    assert b.max_record == 2048
    assert b.limits[EVENTS] == Limits(1 << 20, 3 << 20)
    assert b.limits[LOGS].per_site == 1 << 19


def test_the_size_floor_is_a_lower_bound_that_spares_measuring_a_refused_record() -> None:
    for msg in (
        JobEvent("j", "log", data={"key": "blob", "value": "x" * 5000, "kind": "text"}),
        JobEvent("j", "custom", detail="d" * 3000, data={"a": {"b": "y" * 100, "c": 1}, "z": [1, 2]}),
        JobEvent("j", "log_text", data={"lines": ["ab", "c"], "dropped": 0}),
    ):
        kind, floor = size_floor(msg)
        assert (kind, 0) < (kind, floor) <= stored_size(msg)
    b = budgets()
    assert not b.fits("j", "a", EVENTS, 41)  # over the cap: refused before any exact sizing
    assert b.fits("j", "a", EVENTS, 40) and b.used("j", EVENTS) == 0  # asking charges nothing


def test_a_restarted_broker_starts_a_jobs_budgets_from_what_its_store_holds(tmp_path: Path) -> None:
    """No sockets: the gate over a real workspace (SQLite and a log file), as a broker restarted on it sees it."""
    config = BrokerConfig(workspace=str(tmp_path), events_mb_per_site=0.01, logs_mb_per_site=0.01)
    store = JobStore(tmp_path)
    guard = Guard(config, tmp_path)
    try:
        store.create_job("j", "tiny", {})
        store.record_event("j", "a", "log", {"key": "t", "value": "x" * 9000})
        store.record_cross_site("j", "a", "m", 1, {"x": 1.0})  # the broker's own record: not the site's bytes
        (store.job_dir("j") / "logs").mkdir(parents=True)
        (store.job_dir("j") / "logs" / "a.log").write_text("y" * 10_000)
        told: list[object] = []
        outbox = Outbox(Registry(1.0, 5), guard, Metrics())
        gate = StoreGate(config, store, outbox=outbox, guard=guard, spawn=told.append, clock=lambda: 0.0)
        small = JobEvent("j", "log", data={"key": "t", "value": "x" * 2000})
        assert not gate.admit("j", "a", small)  # 9 KB stored + 2 KB > 10,485 bytes
        assert gate.admit("j", "b", small)  # another site has its own budget
        assert not gate.admit("j", "a", JobEvent("j", "log_text", data={"lines": ["z" * 500], "dropped": 0}))
        assert gate.admit("j", "a", JobEvent("j", "log_text", data={"lines": ["z" * 200], "dropped": 0}))
        assert told == []  # site a is not connected: nobody to tell
        guard.audit.flush()
        refusals = [r for r in read_audit(tmp_path / "audit.jsonl") if r["kind"] == "refused"]
        assert [r["by"] for r in refusals] == ["a", "a"] and all("budget" in r["reason"] for r in refusals)
    finally:
        guard.close()
        store.close()
