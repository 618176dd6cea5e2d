"""CrossSiteEval without sockets: the wrapped strategy's training, then submit_model and the site-by-model matrix."""

from __future__ import annotations

import pytest
import torch

from fedbus.errors import StrategyError
from fedbus.strategy import Accepted, Cancel, Dispatch, Evaluated, Failed, FedAvg, FedBuff, Finished, Publish, Rejected
from fedbus.strategy.cross_site import CrossSiteEval
from tests.strategy.helpers import answer, like, make_model, of


def _train(s: CrossSiteEval, acts: list, value: float, now: float = 1.0) -> list:
    """Answer every training Dispatch in ``acts`` with FULL params of ``value``; the actions that follow."""
    out: list = []
    for d in of(acts, Dispatch):
        assert d.kind == "train"
        out += s.on_update(answer(d, like(s.model, value), metrics={"loss": value}), now)
    return out


def _submit_all(s: CrossSiteEval, acts: list, values: dict[str, float]) -> list:
    out: list = []
    for d in of(acts, Dispatch):
        assert d.kind == "submit_model" and d.model is None
        out += s.on_update(answer(d, like(s.model, values[d.site], counter=5)), 2.0)
    return out


def _evaluate_until_done(s: CrossSiteEval, acts: list, score: dict[str, float]) -> list:
    """Answer evaluate tasks one by one (each answer brings the site's next model) until none is left."""
    log = list(acts)
    queue = of(acts, Dispatch)
    while queue:
        d = queue.pop(0)
        assert d.kind == "evaluate"
        model = s.model if d.model is None else d.model
        metrics = {"acc": float(model["w"].flatten()[0]) + score[d.site]}
        more = s.on_update(answer(d, None, metrics=metrics), 3.0)
        log += more
        queue += of(more, Dispatch)
    return log


def test_fedavg_then_every_site_evaluates_every_model() -> None:
    s = CrossSiteEval(FedAvg(min_clients=2, num_rounds=1), {"pretrained": like(make_model(), 7.0, counter=5)})
    model = make_model()
    acts = s.start(model, ["site-1", "site-2"], 0.0)
    assert s.state()["cross_site_phase"] == "inner"
    acts = _train(s, acts, 1.0)
    # FedAvg finished: its Finished is held back and every site is asked for its local model instead.
    assert not of(acts, Finished) and len(of(acts, Publish)) == 1 and len(of(acts, Accepted)) == 2
    submits = of(acts, Dispatch)
    assert sorted(d.site for d in submits) == ["site-1", "site-2"]
    assert all(d.kind == "submit_model" and d.version == 1 for d in submits)
    assert s.input_spec() is None

    acts = _submit_all(s, acts, {"site-1": 10.0, "site-2": 20.0})
    first = of(acts, Dispatch)
    # One task per site at a time, the global model first (streamed as the global version).
    assert [(d.site, d.model_name, d.model is None) for d in first] == [
        ("site-1", "server", True),
        ("site-2", "server", True),
    ]
    log = _evaluate_until_done(s, acts, {"site-1": 0.0, "site-2": 0.5})
    assert isinstance(log[-1], Finished) and s.done
    assert "num_rounds=1 reached" in log[-1].reason and "4 models" in log[-1].reason
    cells = {(e.model_name, e.site): e.metrics["acc"] for e in of(log, Evaluated)}
    assert cells == {
        ("server", "site-1"): 1.0,
        ("server", "site-2"): 1.5,
        ("site-1", "site-1"): 10.0,
        ("site-1", "site-2"): 10.5,
        ("site-2", "site-1"): 20.0,
        ("site-2", "site-2"): 20.5,
        ("pretrained", "site-1"): 7.0,
        ("pretrained", "site-2"): 7.5,
    }
    assert s.results["site-2"]["site-1"] == {"acc": 20.0}
    assert all(e.version == 1 for e in of(log, Evaluated))


def test_a_submitted_model_must_match_the_global_model() -> None:
    s = CrossSiteEval(None)
    model = make_model()
    acts = s.start(model, ["a", "b"], 0.0)
    d = {x.site: x for x in of(acts, Dispatch)}
    bad = {"w": torch.zeros(3, 2), "b": torch.full((2,), float("nan")), "num_batches_tracked": torch.tensor(1)}
    out = s.on_update(answer(d["a"], bad), 1.0)
    assert isinstance(out[0], Rejected) and "non-finite" in out[0].reason
    out += s.on_update(answer(d["b"], {"w": torch.zeros(3, 2)}), 1.0)
    assert isinstance(out[1], Rejected) and "missing tensors" in out[1].reason
    # Neither site's model is kept: only the (start) global model is evaluated, by both sites.
    evals = of(out, Dispatch)
    assert [(x.site, x.model_name) for x in evals] == [("a", "server"), ("b", "server")]
    diff = s.on_update(answer(d["a"], like(model, 1.0), params_type="DIFF"), 1.0)
    assert isinstance(diff[0], Rejected) and "already answered" in diff[0].reason


def test_sites_that_leave_or_fail_are_skipped_and_one_that_returns_resumes() -> None:
    s = CrossSiteEval(None, timeout=100.0)
    model = make_model()
    acts = s.start(model, ["a", "b", "c"], 0.0)
    d = {x.site: x for x in of(acts, Dispatch)}
    s.on_update(answer(d["a"], like(model, 1.0, counter=5)), 1.0)
    s.task_failed("c", d["c"].task_id, "script crashed", 1.0)  # c submits nothing
    acts = s.on_update(answer(d["b"], like(model, 2.0, counter=5)), 1.0)
    assert sorted(x.model_name for x in of(acts, Dispatch)) == ["server"] * 3  # c still evaluates
    e = {x.site: x for x in of(acts, Dispatch)}
    left = s.site_left("b", 2.0)
    assert left == []
    # b comes back during the phase: its lost task is sent again (a new id), the old id is refused.
    back = of(s.site_joined("b", 2.5), Dispatch)
    assert [(x.site, x.model_name) for x in back] == [("b", "server")] and back[0].task_id != e["b"].task_id
    late = s.on_update(answer(e["b"], None, metrics={"acc": 1.0}), 2.6)
    assert isinstance(late[0], Rejected) and "left before answering" in late[0].reason
    # c fails its first evaluation: skipped, its next model comes.
    nxt = of(s.task_failed("c", e["c"].task_id, "bad", 3.0), Dispatch)
    assert [(x.site, x.model_name) for x in nxt] == [("c", "a")]
    # c leaves for good: the phase ends once a and b are through, with c's row partial.
    s.site_left("c", 3.1)
    log = _evaluate_until_done(s, [e["a"], back[0]], {"a": 0.0, "b": 0.0, "c": 0.0})
    assert isinstance(log[-1], Finished)
    assert set(s.results) == {"server", "a", "b"}
    assert set(s.results["server"]) == {"a", "b"} and set(s.results["a"]) == {"a", "b"}


def test_the_phase_times_out_and_cancels_what_is_pending() -> None:
    s = CrossSiteEval(None, timeout=10.0)
    acts = s.start(make_model(), ["a", "b"], 0.0)
    assert s.next_deadline == 10.0
    d = {x.site: x for x in of(acts, Dispatch)}
    s.on_update(answer(d["a"], like(make_model(), 1.0, counter=5)), 1.0)
    acts = s.tick(11.0)  # b never submitted: the evaluation starts with server and a's model
    assert [type(x) for x in acts[:1]] == [Cancel] and acts[0].site == "b"
    evals = of(acts, Dispatch)
    assert sorted((x.site, x.model_name) for x in evals) == [("a", "server"), ("b", "server")]
    assert s.next_deadline == 21.0
    out = s.tick(21.0)
    assert isinstance(out[-1], Finished) and "timed out" in out[-1].reason and len(of(out, Cancel)) == 2


def test_inner_failure_ends_the_job_without_cross_site_evaluation() -> None:
    s = CrossSiteEval(FedAvg(min_clients=2, num_rounds=2))
    acts = s.start(make_model(), ["a", "b"], 0.0)
    d = of(acts, Dispatch)
    s.site_left("a", 1.0)
    out = s.task_failed("b", d[1].task_id, "crashed", 1.0)
    assert isinstance(out[-1], Failed) and s.done
    assert s.site_joined("a", 2.0) == []


def test_late_answers_to_inner_tasks_go_to_inner_and_options_come_from_it() -> None:
    inner = FedAvg(min_clients=1, num_rounds=1, round_timeout=5.0)
    s = CrossSiteEval(inner)
    acts = s.start(make_model(), ["a", "b"], 0.0)
    assert s.next_deadline == 5.0 and s.client_options() == {}
    d = {x.site: x for x in of(acts, Dispatch)}
    s.on_update(answer(d["a"], like(make_model(), 1.0)), 1.0)
    acts = s.tick(6.0)  # round closes with a only; b's task is cancelled; cross-site begins
    assert of(acts, Cancel)[0].site == "b" and len(of(acts, Dispatch)) == 2
    late = s.on_update(answer(d["b"], like(make_model(), 1.0)), 6.5)
    assert isinstance(late[0], Rejected) and "job has ended" in late[0].reason


def test_standalone_evaluation_of_server_models_only() -> None:
    models = {"m1": like(make_model(), 1.0, counter=5), "m2": like(make_model(), 2.0, counter=5)}
    s = CrossSiteEval(None, models, evaluate_global=False, submit_models=False)
    acts = s.start(make_model(), ["a"], 0.0)
    log = _evaluate_until_done(s, acts, {"a": 0.0})
    assert s.results == {"m1": {"a": {"acc": 1.0}}, "m2": {"a": {"acc": 2.0}}}
    assert isinstance(log[-1], Finished)


def test_bad_construction_is_refused() -> None:
    with pytest.raises(StrategyError, match="wraps a Strategy"):
        CrossSiteEval(object())  # type: ignore[arg-type]
    with pytest.raises(StrategyError, match="server model name"):
        CrossSiteEval(None, {"server": make_model()})
    s = CrossSiteEval(None)
    with pytest.raises(StrategyError, match="before any other event"):
        s.tick(0.0)
    s.start(make_model(), [], 0.0)
    assert s.done  # no site: nothing to evaluate
    with pytest.raises(StrategyError, match="before start"):
        s.add_server_models({"x": make_model()})


def test_an_asynchronous_inner_strategy_keeps_its_wire_contract_and_is_evaluated_after_it_finishes() -> None:
    inner = FedBuff(concurrency=2, buffer_size=2, num_versions=1)
    s = CrossSiteEval(inner)
    assert s.params_type == "DIFF" and s.restores_updates  # the controller asks DIFF and keeps buffered updates
    model = make_model()
    acts = s.start(model, ["a", "b"], 0.0)
    out: list = []
    for d in of(acts, Dispatch):
        out += s.on_update(answer(d, like(model, 0.5, counter=0), params_type="DIFF"), 1.0)
    assert len(of(out, Publish)) == 1 and not of(out, Finished)
    # a was sent another training task before the buffer filled; it is cancelled when FedBuff finishes.
    assert [d.kind for d in of(out, Dispatch)] == ["train", "submit_model", "submit_model"]
    assert [c.site for c in of(out, Cancel)] == ["a"]
    submits = [d for d in of(out, Dispatch) if d.kind == "submit_model"]
    log = _evaluate_until_done(s, _submit_all(s, submits, {"a": 1.0, "b": 2.0}), {"a": 0.0, "b": 0.0})
    assert isinstance(log[-1], Finished) and sorted(s.results) == ["a", "b", "server"]
