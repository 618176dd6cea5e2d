"""How a Run is filled and shown: evaluations per version, busy time, progress snapshots and reporters."""

from __future__ import annotations

import pytest

from fedbus.recipes import Progress
from fedbus.recipes.progress import make_reporter
from fedbus.recipes.run import busy_seconds, group_evaluations


def test_evaluations_are_grouped_per_version_with_a_weighted_mean() -> None:
    events = [
        {"site": "a", "data": {"version": 2, "acc": 0.5, "num_samples": 10}, "time": 12.0},
        {"site": "b", "data": {"version": 2, "acc": 1.0, "num_samples": 30}, "time": 12.5},
        {"site": "a", "data": {"version": 1, "acc": 0.2}, "time": 11.0},
        {"site": "b", "data": {"version": 1, "acc": 0.4, "note": "text is dropped"}, "time": 11.2},
        {"site": "c", "data": {"acc": 0.9}, "time": 13.0},  # no version: not an evaluation we can place
    ]
    ev = group_evaluations(events, t0=10.0)
    assert [e.version for e in ev] == [1, 2]
    assert ev[0].sites == {"a": {"acc": 0.2}, "b": {"acc": 0.4}} and ev[0].mean == pytest.approx({"acc": 0.3})
    assert ev[0].time == 1.0
    assert ev[1].mean == pytest.approx({"acc": (0.5 * 10 + 1.0 * 30) / 40})  # weighted by num_samples


def test_busy_time_counts_overlapping_training_once() -> None:
    tasks = [
        {"received_at": 10.0, "train_s": 4.0},  # [6, 10]
        {"received_at": 9.0, "train_s": 2.0},  # [7, 9], inside the first
        {"received_at": 12.0, "train_s": 3.0},  # [9, 12], overlaps by 1
        {"received_at": 20.0, "train_s": 1.0},  # [19, 20]
        {"received_at": None, "train_s": 1.0},  # no record: ignored
    ]
    assert busy_seconds(tasks) == pytest.approx(4.0 + 2.0 + 1.0)
    assert busy_seconds([]) == 0.0


def test_progress_from_a_status_entry() -> None:
    job = {
        "id": "j-1",
        "state": "running",
        "version": 1,
        "sites": ["a", "b", "c"],
        "last_metrics": {"accuracy": 0.91234, "strategy/num_updates": 3.0, "loss": 0.3},
        "live": {"version": 2, "tasks_in_flight": 1, "strategy": {"round_accepted": 2}},
    }
    p = Progress.from_status(job, total=5, elapsed_s=1.5)
    assert (p.version, p.total, p.sites, p.reporting, p.busy) == (2, 5, 3, 2, 1)
    assert p.short_metrics() == {"accuracy": "0.9123", "loss": "0.3"}  # strategy counters left out
    done = Progress.from_status({"id": "j-1", "state": "finished", "version": 5, "sites": []}, 5, 2.0)
    assert done.version == 5 and done.reporting == 0


def test_reporter_follows_the_progress_argument() -> None:
    assert make_reporter(False) is None
    seen: list[Progress] = []
    r = make_reporter(seen.append)
    assert r is not None
    p = Progress("j", "running", 0, None, 1, 0, 0, 0.0)
    r.update(p)
    assert seen == [p]
    assert type(make_reporter(None)).__name__ == "_LogLines"  # pytest's stderr is no terminal
    with pytest.raises(TypeError):
        make_reporter("yes")  # type: ignore[arg-type]
