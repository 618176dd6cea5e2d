"""FedAvg's wall-clock budget: training stops at a round boundary, or at the deadline inside a round."""

from __future__ import annotations

import pytest

from fedbus.errors import ConfigError
from fedbus.strategy import Cancel, Dispatch, Evaluated, FedAvg, Finished, Publish, make_strategy

from .helpers import answer, like, make_model, of

SITES = ["a", "b"]


def started(**kw: object) -> tuple[FedAvg, dict[str, Dispatch]]:
    s = FedAvg(**{"min_clients": 2, "num_rounds": 10, **kw})  # type: ignore[arg-type]
    acts = s.start(make_model(), SITES, now=0.0)
    return s, {d.site: d for d in of(acts, Dispatch)}


def finish_round(s: FedAvg, d: dict[str, Dispatch], now: float) -> list:
    model = make_model()
    acts = s.on_update(answer(d["a"], like(model, 1.0)), now)
    return acts + s.on_update(answer(d["b"], like(model, 2.0)), now)


def test_budget_is_checked_and_reaches_the_job_toml() -> None:
    with pytest.raises(ConfigError, match="time_budget"):
        FedAvg(min_clients=1, num_rounds=1, time_budget=0)
    assert make_strategy("fedavg", min_clients=1, num_rounds=2, time_budget=5).time_budget == 5.0  # type: ignore[attr-defined]


def test_next_deadline_is_the_budget_while_training() -> None:
    s, _ = started(time_budget=10.0)
    assert s.next_deadline == 10.0
    s2, _ = started(time_budget=10.0, round_timeout=3.0)
    assert s2.next_deadline == 3.0  # the earlier of round timeout and budget


def test_round_closing_after_the_budget_is_published_and_ends_the_job() -> None:
    s, d = started(time_budget=5.0)
    acts = finish_round(s, d, now=6.0)  # both results arrive (in one event each) after the budget
    # the first event at t=6 fires the budget: the open round is dropped, nothing is published
    assert not of(acts, Publish)
    (fin,) = of(acts, Finished)
    assert "time budget of 5 s spent at version 0" in fin.reason and s.done


def test_budget_spent_at_a_round_boundary_publishes_then_finishes() -> None:
    s, d = started(time_budget=5.0)
    model = make_model()
    s.on_update(answer(d["a"], like(model, 1.0)), 4.0)
    acts = s.on_update(answer(d["b"], like(model, 3.0)), 4.9)  # closes round 1 before the budget
    assert [p.version for p in of(acts, Publish)] == [1] and not s.done
    d2 = {x.site: x for x in of(acts, Dispatch)}
    s.on_update(answer(d2["a"], like(model, 1.0)), 4.95)
    acts = s.tick(5.0)  # the deadline: round 2 is cut, its partial aggregate dropped
    assert {c.site for c in of(acts, Cancel)} == {"b"} and not of(acts, Publish)
    (fin,) = of(acts, Finished)
    assert fin.reason == "time budget of 5 s spent at version 1" and s.version == 1


def test_budget_with_evaluation_evaluates_the_last_version_once() -> None:
    s, d = started(time_budget=5.0, evaluate_every=1)
    model = make_model()
    s.on_update(answer(d["a"], like(model, 1.0)), 1.0)
    acts = s.on_update(answer(d["b"], like(model, 1.0)), 2.0)  # v1 published, periodic evaluation starts
    evals = {x.site: x for x in of(acts, Dispatch) if x.kind == "evaluate"}
    assert set(evals) == {"a", "b"}
    s.on_update(answer(evals["a"], None, metrics={"acc": 0.5}), 3.0)
    acts = s.on_update(answer(evals["b"], None, metrics={"acc": 0.7}), 6.0)  # eval ends after the budget
    assert len(of(acts, Evaluated)) == 1 and not of(acts, Dispatch)  # v1 was just evaluated: no second pass
    (fin,) = of(acts, Finished)
    assert "time budget of 5 s spent at version 1" in fin.reason


def test_budget_while_waiting_for_sites_finishes() -> None:
    s = FedAvg(min_clients=3, num_rounds=2, time_budget=2.0)
    assert s.start(make_model(), SITES, now=0.0) == [] and s.next_deadline == 2.0
    acts = s.tick(2.0)
    assert of(acts, Finished) and s.done and s.next_deadline is None


def test_budget_mid_round_with_evaluation_runs_a_final_evaluation() -> None:
    s, d = started(time_budget=5.0, evaluate_every=3)
    acts = s.tick(5.0)
    assert {c.task_id for c in of(acts, Cancel)} == {d["a"].task_id, d["b"].task_id}
    evals = [x for x in of(acts, Dispatch) if x.kind == "evaluate"]
    assert [(x.site, x.version) for x in evals] == [("a", 0), ("b", 0)] and not s.done
    s.on_update(answer(evals[0], None, metrics={"acc": 0.1}), 6.0)
    acts = s.on_update(answer(evals[1], None, metrics={"acc": 0.2}), 7.0)
    (fin,) = of(acts, Finished)
    assert fin.reason.startswith("time budget of 5 s spent at version 0; final evaluation: 2 of 2")
