"""FedAvg as an event-driven barrier: plain tensors, no sockets, time passed in by hand."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from fedbus.errors import ConfigError, StrategyError
from fedbus.strategy import (
    Accepted,
    Cancel,
    Dispatch,
    Evaluated,
    Failed,
    FedAvg,
    Finished,
    Publish,
    Rejected,
    Update,
)

from .helpers import answer, clone, like, make_model, of, same

SITES = ["a", "b", "c"]


def started(sites: list[str] = SITES, model: dict[str, torch.Tensor] | None = None, **kw: object):
    kw = {"min_clients": 2, "num_rounds": 3, **kw}
    s = FedAvg(**kw)  # type: ignore[arg-type]
    acts = s.start(model if model is not None else make_model(), sites, now=0.0)
    return s, {d.site: d for d in of(acts, Dispatch)}


def test_start_dispatches_version_zero_to_every_site_in_sorted_order() -> None:
    s = FedAvg(min_clients=1, num_rounds=1)
    acts = s.start(make_model(), ["c", "a", "b"], now=0.0)
    assert acts == [Dispatch("a", "0-a-0", 0), Dispatch("b", "0-b-1", 0), Dispatch("c", "0-c-2", 0)]
    assert s.version == 0 and not s.done and s.next_deadline is None
    assert s.params_type == "FULL"  # what the controller asks sites to send


def test_weighted_mean_equals_hand_computed_result() -> None:
    model = {"w": torch.zeros(2)}
    s, d = started(["a", "b"], model)
    a1 = s.on_update(answer(d["a"], {"w": torch.tensor([1.0, 2.0])}, weight=1.0, metrics={"loss": 1.0}), 1.0)
    assert a1 == [Accepted(d["a"].task_id, "a", 0, 0, 1.0)]
    acts = s.on_update(answer(d["b"], {"w": torch.tensor([3.0, 6.0])}, weight=3.0, metrics={"loss": 3.0}), 2.0)
    (pub,) = of(acts, Publish)
    assert pub.version == 1 == s.version
    assert torch.equal(pub.model["w"], torch.tensor([2.5, 5.0]))  # (1*1 + 3*3) / 4, (1*2 + 3*6) / 4
    assert pub.metrics["loss"] == 2.5 and pub.metrics["strategy/num_updates"] == 2.0
    assert [x.version for x in of(acts, Dispatch)] == [1, 1]  # next round starts at once
    assert torch.equal(s.model["w"], pub.model["w"])


@settings(max_examples=30, deadline=None)
@given(
    weights=st.lists(st.floats(0.1, 100.0), min_size=1, max_size=6),
    diff=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_weighted_mean_matches_reference_for_random_weights(weights: list[float], diff: bool, seed: int) -> None:
    model = make_model(seed)
    sites = [f"s{i}" for i in range(len(weights))]
    s, d = started(sites, model, min_clients=1)
    g = torch.Generator().manual_seed(seed)
    sent = [{"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g)} for _ in weights]
    acts = []
    for site, w, p in zip(sites, weights, sent, strict=True):
        params = {**p, "num_batches_tracked": torch.tensor(seed % 7)}
        acts = s.on_update(answer(d[site], params, "DIFF" if diff else "FULL", weight=w), 1.0)
    (pub,) = of(acts, Publish)
    total = sum(weights)
    for k in ("w", "b"):
        mean = sum(w * p[k].double() for w, p in zip(weights, sent, strict=True)) / total
        ref = model[k].double() + mean if diff else mean
        torch.testing.assert_close(pub.model[k].double(), ref, rtol=1e-5, atol=1e-5)
    expected_counter = 5 if diff else seed % 7  # DIFF leaves integers alone; FULL takes the max
    assert pub.model["num_batches_tracked"].item() == expected_counter


def test_diff_mode_adds_the_weighted_mean_delta_to_the_global() -> None:
    model = {"w": torch.tensor([1.0, 1.0])}
    s, d = started(["a", "b"], model)
    s.on_update(answer(d["a"], {"w": torch.tensor([1.0, 0.0])}, "DIFF"), 1.0)
    (pub,) = of(s.on_update(answer(d["b"], {"w": torch.tensor([0.0, 2.0])}, "DIFF"), 1.0), Publish)
    assert torch.equal(pub.model["w"], torch.tensor([1.5, 2.0]))


def test_mixed_full_and_diff_updates_agree_with_all_full() -> None:
    model = {"w": torch.tensor([1.0, 2.0])}
    s, d = started(["a", "b"], model)
    s.on_update(answer(d["a"], {"w": torch.tensor([0.5, 0.5])}, "DIFF", weight=2.0), 1.0)  # full: [1.5, 2.5]
    (pub,) = of(s.on_update(answer(d["b"], {"w": torch.tensor([3.0, 4.0])}, "FULL", weight=2.0), 1.0), Publish)
    torch.testing.assert_close(pub.model["w"], torch.tensor([2.25, 3.25]))


def test_round_timeout_with_enough_results_publishes_and_cancels_stragglers() -> None:
    s, d = started(round_timeout=10.0)
    assert s.next_deadline == 10.0
    s.on_update(answer(d["a"], like(make_model(), 1.0)), 1.0)
    s.on_update(answer(d["b"], like(make_model(), 3.0)), 2.0)
    assert s.tick(9.9) == []
    acts = s.tick(10.0)
    assert isinstance(acts[0], Cancel) and acts[0].task_id == d["c"].task_id
    (pub,) = of(acts, Publish)
    assert pub.metrics["strategy/timed_out"] == 1.0 and torch.all(pub.model["w"] == 2.0)
    nxt = of(acts, Dispatch)
    assert [x.site for x in nxt] == SITES and all(x.version == 1 for x in nxt)
    assert s.next_deadline == 20.0
    (rej,) = s.on_update(answer(d["c"], like(make_model(), 9.0)), 11.0)
    assert isinstance(rej, Rejected) and rej.reason.startswith("stale")


def test_round_timeout_with_too_few_results_fails_with_a_clear_reason() -> None:
    s, d = started(round_timeout=30.0)
    s.on_update(answer(d["a"], like(make_model(), 1.0)), 1.0)
    acts = s.tick(30.0)
    assert acts[-1] == Failed("round 1: 1 of min_clients=2 results before the 30 s round timeout")
    assert {c.site for c in of(acts, Cancel)} == {"b", "c"}
    assert s.done and s.next_deadline is None and s.tick(100.0) == []
    (rej,) = s.on_update(answer(d["b"], like(make_model(), 1.0)), 31.0)
    assert isinstance(rej, Rejected)


def test_a_late_tick_cannot_let_a_result_into_a_closed_round() -> None:
    s, d = started(round_timeout=10.0)
    s.on_update(answer(d["a"], like(make_model(), 1.0)), 1.0)
    s.on_update(answer(d["b"], like(make_model(), 1.0)), 2.0)
    acts = s.on_update(answer(d["c"], like(make_model(), 100.0)), 12.0)  # tick at 10 never came
    (pub,) = of(acts, Publish)
    assert torch.all(pub.model["w"] == 1.0)
    assert isinstance(acts[-1], Rejected) and "stale" in acts[-1].reason


def test_site_left_mid_round_shrinks_the_expected_set() -> None:
    s, d = started()
    assert s.site_left("c", 1.0) == []
    s.on_update(answer(d["a"], like(make_model(), 1.0)), 2.0)
    acts = s.on_update(answer(d["b"], like(make_model(), 1.0)), 3.0)
    assert len(of(acts, Publish)) == 1
    assert [x.site for x in of(acts, Dispatch)] == ["a", "b"]  # c is gone


def test_site_left_below_min_clients_fails_the_round() -> None:
    s, d = started(["a", "b"])
    s.on_update(answer(d["a"], like(make_model(), 1.0)), 1.0)
    acts = s.site_left("b", 2.0)
    assert isinstance(acts[-1], Failed) and "round 1: 1 of min_clients=2" in acts[-1].reason
    assert "1 sites left" in acts[-1].reason


def test_a_site_back_in_the_same_round_gets_its_task_again_once() -> None:
    s, d = started(["a", "b"], min_clients=2)
    assert s.site_left("b", 1.0) == []  # a's task still pending: the round waits
    (again,) = s.site_joined("b", 2.0)
    assert again == Dispatch("b", again.task_id, 0) and again.task_id != d["b"].task_id
    assert s.state()["round_retried"] == 1 and s.state()["round_left"] == 0
    (late,) = s.on_update(answer(d["b"], like(make_model(), 9.0)), 3.0)  # the first task's answer: stale
    assert isinstance(late, Rejected)
    s.on_update(answer(d["a"], like(make_model(), 1.0)), 4.0)
    acts = s.on_update(answer(again, like(make_model(), 3.0)), 5.0)
    (pub,) = of(acts, Publish)
    assert torch.all(pub.model["w"] == 2.0)  # a's 1 and b's second answer, 3: counted once each
    # gone again in the next round, and again in that round: one more chance in it, not two
    d2 = {x.site: x for x in of(acts, Dispatch)}
    s.site_left("b", 6.0)
    (once,) = s.site_joined("b", 7.0)
    s.site_left("b", 8.0)
    assert s.site_joined("b", 9.0) == []
    acts = s.on_update(answer(d2["a"], like(make_model(), 1.0)), 10.0)
    assert isinstance(acts[-1], Failed) and "1 sites left" in acts[-1].reason and once.version == 1


def test_a_site_new_to_the_round_still_waits_for_the_next() -> None:
    s, d = started(["a", "b", "c"], min_clients=1)
    assert s.site_left("c", 0.5) == [] and s.site_joined("d", 1.0) == []  # d never had a task in this round
    s.task_failed("b", d["b"].task_id, "script exited with 1", 2.0)  # b stays: nothing brings its task back
    assert s.site_joined("b", 2.5) == []
    (again,) = s.site_joined("c", 3.0)  # c left with its task unanswered: back, it has it again
    s.on_update(answer(d["a"], like(make_model(), 1.0)), 4.0)
    acts = s.on_update(answer(again, like(make_model(), 1.0)), 5.0)
    assert sorted(x.site for x in of(acts, Dispatch)) == ["a", "b", "c", "d"]


def test_a_task_that_failed_with_its_site_is_given_again_when_the_site_returns() -> None:
    s, d = started(["a", "b"], min_clients=2)
    s.task_failed("b", d["b"].task_id, "script exited with -15", 1.0)  # the daemon stopped, and its script
    s.site_left("b", 1.0)
    (again,) = s.site_joined("b", 2.0)  # a restarted daemon
    assert s.state()["round_failed"] == 0 and s.state()["round_retried"] == 1
    s.on_update(answer(d["a"], like(make_model(), 1.0)), 3.0)
    assert of(s.on_update(answer(again, like(make_model(), 1.0)), 4.0), Publish)


def test_an_evaluation_lost_to_a_leave_is_asked_again() -> None:
    s, d = started(["a", "b"], min_clients=2, num_rounds=1, evaluate_every=1)
    s.on_update(answer(d["a"], like(make_model(), 1.0)), 1.0)
    acts = s.on_update(answer(d["b"], like(make_model(), 1.0)), 2.0)
    evals = {x.site: x for x in of(acts, Dispatch)}
    assert {x.kind for x in evals.values()} == {"evaluate"}
    s.site_left("b", 3.0)
    (again,) = s.site_joined("b", 4.0)
    assert again.kind == "evaluate" and again.version == 1
    s.on_update(Update("a", evals["a"].task_id, 1, None, "FULL", metrics={"acc": 0.5}), 5.0)
    acts = s.on_update(Update("b", again.task_id, 1, None, "FULL", metrics={"acc": 0.7}), 6.0)
    assert len(of(acts, Evaluated)) == 1 and isinstance(acts[-1], Finished)
    assert "2 of 2 sites reported" in acts[-1].reason


def test_task_failed_counts_as_an_answer() -> None:
    s, d = started()
    s.on_update(answer(d["a"], like(make_model(), 1.0)), 1.0)
    s.on_update(answer(d["b"], like(make_model(), 1.0)), 1.0)
    assert s.task_failed("c", "not-a-task", "crash", 2.0) == []
    acts = s.task_failed("c", d["c"].task_id, "script exited with 1", 2.0)
    assert len(of(acts, Publish)) == 1 and s.state()["failed_tasks"] == 1
    (rej,) = s.on_update(answer(d["c"], like(make_model(), 1.0)), 3.0)
    assert isinstance(rej, Rejected) and "failed" in rej.reason


def test_duplicate_unknown_and_misrouted_results_are_rejected_and_never_double_counted() -> None:
    s, d = started()
    assert of(s.on_update(answer(d["a"], like(make_model(), 1.0)), 1.0), Accepted)
    (dup,) = s.on_update(answer(d["a"], like(make_model(), 1.0)), 1.0)
    assert isinstance(dup, Rejected) and "duplicate" in dup.reason
    (unk,) = s.on_update(Update("a", "7-a-99", 0, like(make_model(), 1.0), "FULL"), 1.0)
    assert isinstance(unk, Rejected) and "unknown task" in unk.reason
    spoof = Update("b", d["c"].task_id, 0, like(make_model(), 50.0), "FULL")
    (mis,) = s.on_update(spoof, 1.0)
    assert isinstance(mis, Rejected) and "sent to site 'c'" in mis.reason
    s.on_update(answer(d["b"], like(make_model(), 4.0)), 2.0)
    (pub,) = of(s.on_update(answer(d["c"], like(make_model(), 4.0)), 3.0), Publish)
    assert torch.all(pub.model["w"] == 3.0)  # (1 + 4 + 4) / 3: a counted once, the spoof not at all
    assert s.state()["rejected"] == 3


def corrupt(kind: str) -> dict[str, torch.Tensor]:
    p = like(make_model(), 100.0)
    if kind == "nan":
        p["w"][0, 0] = math.nan
    elif kind == "inf":
        p["b"][1] = math.inf
    elif kind == "shape":
        p["w"] = torch.zeros(2, 3)
    elif kind == "dtype":
        p["b"] = p["b"].double()
    elif kind == "name":
        p["bias"] = p.pop("b")
    return p


@pytest.mark.parametrize("kind", ["nan", "inf", "shape", "dtype", "name"])
def test_bad_updates_are_rejected_while_the_round_completes_from_the_others(kind: str) -> None:
    s, d = started(min_clients=2)
    s.on_update(answer(d["a"], like(make_model(), 1.0)), 1.0)
    (rej,) = s.on_update(answer(d["b"], corrupt(kind)), 1.0)
    assert isinstance(rej, Rejected) and rej.site == "b"
    (pub,) = of(s.on_update(answer(d["c"], like(make_model(), 3.0)), 2.0), Publish)
    assert torch.all(pub.model["w"] == 2.0) and pub.metrics["strategy/rejected"] == 1.0


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [("weight", 0.0, "weight"), ("weight", math.nan, "weight"), ("weight", -1.0, "weight"),
     ("base_version", 3, "base_version mismatch"), ("params", None, "must carry params"),
     ("params_type", "HALF", "params_type")],
)  # fmt: skip
def test_invalid_update_fields_are_rejected(field: str, value: object, needle: str) -> None:
    s, d = started()
    fields = {"site": "a", "task_id": d["a"].task_id, "base_version": 0, "params": like(make_model(), 1.0),
              "params_type": "FULL", "weight": 1.0}  # fmt: skip
    (rej,) = s.on_update(Update(**{**fields, field: value}), 1.0)  # type: ignore[arg-type]
    assert isinstance(rej, Rejected) and needle in rej.reason


def test_waits_until_min_clients_have_joined() -> None:
    s = FedAvg(min_clients=2, num_rounds=1)
    assert s.start(make_model(), ["b"], now=0.0) == []
    assert s.state()["phase"] == "waiting"
    assert s.site_joined("b", 1.0) == []  # idempotent
    acts = s.site_joined("a", 2.0)
    assert [(x.site, x.version) for x in of(acts, Dispatch)] == [("a", 0), ("b", 0)]
    assert s.site_joined("c", 3.0) == []  # joins mid-round: waits for the next round


def test_max_clients_rotates_through_sorted_sites() -> None:
    s = FedAvg(min_clients=1, num_rounds=3, max_clients=2)
    acts = s.start(make_model(), ["e", "d", "c", "b", "a"], now=0.0)
    rounds = []
    for _ in range(3):
        ds = of(acts, Dispatch)
        rounds.append([x.site for x in ds])
        for x in ds:
            acts = s.on_update(answer(x, like(make_model(), 1.0)), 1.0)
    assert rounds == [["a", "b"], ["c", "d"], ["a", "e"]]
    assert isinstance(acts[-1], Finished)


def test_finishes_after_num_rounds() -> None:
    s, d = started(["a", "b"], num_rounds=1)
    s.on_update(answer(d["a"], like(make_model(), 1.0)), 1.0)
    acts = s.on_update(answer(d["b"], like(make_model(), 1.0)), 1.0)
    assert [type(x) for x in acts] == [Accepted, Publish, Finished]
    assert s.done and s.site_joined("z", 2.0) == [] and s.site_left("a", 2.0) == []


def test_evaluation_tasks_report_metrics_and_never_change_the_model() -> None:
    s, d = started(["a", "b"], num_rounds=2, evaluate_every=1, round_timeout=5.0)
    s.on_update(answer(d["a"], like(make_model(), 1.0)), 1.0)
    acts = s.on_update(answer(d["b"], like(make_model(), 1.0)), 1.0)
    ev = {x.site: x for x in of(acts, Dispatch)}
    assert [(x.kind, x.version) for x in ev.values()] == [("evaluate", 1)] * 2
    v1 = clone(s.model)
    (e,) = s.on_update(answer(ev["a"], None, metrics={"acc": 0.9, "bad": math.nan}), 2.0)
    assert e == Evaluated(1, "a", {"acc": 0.9})
    acts = s.on_update(answer(ev["b"], like(make_model(), 100.0), metrics={"acc": 0.7}), 2.0)
    assert same(s.model, v1)
    tr = {x.site: x for x in of(acts, Dispatch)}
    assert [(x.kind, x.version) for x in tr.values()] == [("train", 1)] * 2
    s.on_update(answer(tr["a"], like(make_model(), 2.0)), 3.0)
    acts = s.on_update(answer(tr["b"], like(make_model(), 2.0)), 3.0)
    final = of(acts, Dispatch)
    assert [(x.kind, x.version) for x in final] == [("evaluate", 2)] * 2 and not s.done
    s.on_update(answer(final[0], None, metrics={"acc": 1.0}), 4.0)
    acts = s.tick(8.0)  # b never reports: the round timeout ends the final evaluation
    assert isinstance(acts[-1], Finished) and "1 of 2 sites reported" in acts[-1].reason
    assert of(acts, Cancel)[0].site == "b"


def test_inputs_are_not_mutated() -> None:
    model = make_model()
    model0 = clone(model)
    s, d = started(["a", "b"], model, num_rounds=2)
    ua, ub = like(model, 1.0, counter=9), like(model, 3.0)
    ua0, ub0 = clone(ua), clone(ub)
    s.on_update(answer(d["a"], ua, "DIFF"), 1.0)
    acts = s.on_update(answer(d["b"], ub, "FULL"), 1.0)
    (pub,) = of(acts, Publish)
    pub0 = clone(pub.model)
    assert same(model, model0) and same(ua, ua0) and same(ub, ub0)
    for x in of(acts, Dispatch):  # round 2 runs on top of the published version
        s.on_update(answer(x, like(model, 7.0), "DIFF"), 2.0)
    assert s.version == 2
    assert same(pub.model, pub0)  # a published version is never modified afterwards
    model["w"].add_(1.0)
    assert not torch.equal(s.model["w"], model["w"])  # the strategy keeps its own copy


def test_constructor_and_lifecycle_errors() -> None:
    with pytest.raises(ConfigError, match="max_clients"):
        FedAvg(min_clients=3, num_rounds=1, max_clients=2)
    with pytest.raises(ConfigError, match="round_timeout"):
        FedAvg(min_clients=1, num_rounds=1, round_timeout=0)
    with pytest.raises(ConfigError, match="evaluate_every"):
        FedAvg(min_clients=1, num_rounds=1, evaluate_every=-1)
    s = FedAvg(min_clients=1, num_rounds=1)
    with pytest.raises(StrategyError, match="start"):
        s.tick(0.0)
    s.start(make_model(), ["a"], 0.0)
    with pytest.raises(StrategyError, match="twice"):
        s.start(make_model(), ["a"], 0.0)


def test_resume_from_a_checkpointed_version() -> None:
    s = FedAvg(min_clients=1, num_rounds=3)
    (d,) = s.start(make_model(), ["a"], 0.0, version=2)
    assert isinstance(d, Dispatch) and d.version == 2
    acts = s.on_update(answer(d, like(make_model(), 1.0)), 1.0)
    assert of(acts, Publish)[0].version == 3 and isinstance(acts[-1], Finished)
