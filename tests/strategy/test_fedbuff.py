"""FedBuff: buffered asynchronous aggregation with staleness, driven by hand and by a seeded simulator."""

from __future__ import annotations

import math
import random

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
    FedBuff,
    Finished,
    Publish,
    Rejected,
    Update,
)

from .helpers import answer, clone, like, make_model, of, same, simulate


def started(sites: list[str], model: dict[str, torch.Tensor] | None = None, **kw: object):
    kw = {"concurrency": len(sites), "buffer_size": 2, "num_versions": 10, "staleness": "constant", **kw}
    s = FedBuff(**kw)  # type: ignore[arg-type]
    acts = s.start(model if model is not None else {"w": torch.zeros(2)}, sites, now=0.0)
    return s, {d.site: d for d in of(acts, Dispatch)}


def delta(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values)}


def test_buffer_is_applied_after_k_updates_and_bumps_the_version() -> None:
    s, d = started(["a", "b", "c"], buffer_size=2)
    acts = s.on_update(answer(d["a"], delta(1.0, 0.0), "DIFF", metrics={"loss": 2.0}), 1.0)
    assert [type(x) for x in acts] == [Accepted, Dispatch] and s.version == 0
    assert acts[1] == Dispatch("a", "0-a-3", 0)  # not yet a new version
    acts = s.on_update(answer(d["b"], delta(0.0, 4.0), "DIFF", weight=3.0, metrics={"loss": 4.0}), 2.0)
    (pub,) = of(acts, Publish)
    assert pub.version == 1 == s.version
    assert torch.equal(pub.model["w"], torch.tensor([0.5, 2.0]))  # (delta_a + delta_b) / K
    assert pub.metrics["loss"] == 3.5  # weighted by data weight
    assert pub.metrics["strategy/num_updates"] == 2.0 and pub.metrics["strategy/mean_staleness"] == 0.0
    assert acts[-1] == Dispatch("b", "1-b-4", 1)
    assert s.state()["buffered"] == 0


def test_staleness_scales_the_update() -> None:
    s, d = started(["a", "b"], buffer_size=1, staleness="polynomial")
    s.on_update(answer(d["a"], delta(1.0, 1.0), "DIFF"), 1.0)
    acts = s.on_update(answer(d["b"], delta(2.0, 0.0), "DIFF"), 2.0)
    (acc,) = of(acts, Accepted)
    assert acc.staleness == 1 and acc.version == 0 and acc.weight == pytest.approx(1 / math.sqrt(2))
    (pub,) = of(acts, Publish)
    torch.testing.assert_close(pub.model["w"], torch.tensor([1.0 + 2 / math.sqrt(2), 1.0]))
    assert s.state()["staleness_hist"] == {"0": 1, "1": 1}
    assert s.state()["updates_per_version"] == {"0": 2}


def test_updates_beyond_max_staleness_are_dropped_and_counted() -> None:
    s, d = started(["a", "b", "c"], buffer_size=1, max_staleness=1)
    s.on_update(answer(d["a"], delta(1.0, 0.0), "DIFF"), 1.0)  # -> v1
    s.on_update(answer(d["b"], delta(1.0, 0.0), "DIFF"), 2.0)  # s=1 -> v2
    acts = s.on_update(answer(d["c"], delta(9.0, 9.0), "DIFF"), 3.0)  # s=2
    assert acts[0] == Rejected(d["c"].task_id, "c", "stale: s=2 > max_staleness=1")
    assert acts[1:] == [Dispatch("c", "2-c-5", 2)]  # the site is re-dispatched at the current version
    assert s.version == 2 and s.state()["dropped_stale"] == 1 and s.state()["accepted"] == 2


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_k1_constant_lr1_equals_fedasync_immediate_application(seed: int) -> None:
    model = make_model(seed)
    s = FedBuff(concurrency=3, buffer_size=1, num_versions=12, staleness="constant", server_lr=1.0)
    trace: list[tuple[Update, list]] = []
    published, log = simulate(s, model, ["a", "b", "c", "d"], seed, trace=trace)
    applied = [u.params for u, acts in trace if of(acts, Accepted)]
    assert len(published) == len(applied) == 12 and isinstance(log[-1], Finished)
    expected = clone(model)
    for pub, d in zip(published, applied, strict=True):  # every accepted delta lands at once, unscaled
        expected = {k: t + d[k] if t.is_floating_point() else t for k, t in expected.items()}  # type: ignore[index]
        assert same(pub.model, expected)
    assert max(map(int, s.state()["staleness_hist"])) > 0  # stale updates were in the mix, at full weight


def test_idle_sites_get_the_new_version_at_once_and_busy_ones_keep_working() -> None:
    s, d = started(["a", "b", "c"], buffer_size=1)
    acts = s.on_update(answer(d["b"], delta(1.0, 1.0), "DIFF"), 1.0)
    assert [type(x) for x in acts] == [Accepted, Publish, Dispatch]
    assert acts[-1] == Dispatch("b", "1-b-3", 1)  # only the reporter was idle
    assert s.state()["busy"] == 3
    joined = s.site_joined("z", 2.0)
    assert joined == [] and s.state()["sites"] == 4  # concurrency 3 is taken


def test_concurrency_limit_and_fair_rotation_over_more_sites() -> None:
    s, d = started(["a", "b", "c", "d", "e"], concurrency=2, buffer_size=10)
    assert sorted(d) == ["a", "b"]
    acts = s.on_update(answer(d["a"], delta(0.0, 0.0), "DIFF"), 1.0)
    assert of(acts, Dispatch)[0].site == "c"  # least recently dispatched idle site first
    acts = s.task_failed("b", d["b"].task_id, "crash", 2.0)
    assert of(acts, Dispatch)[0].site == "d"
    acts = s.site_left("c", 3.0)
    assert of(acts, Dispatch)[0].site == "e"
    assert s.state()["busy"] == 2 and s.state()["failed_tasks"] == 1


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    concurrency=st.integers(1, 4),
    k=st.integers(1, 3),
    events=st.lists(st.sampled_from(["answer", "fail", "leave", "join", "tick"]), max_size=60),
)
def test_scheduling_invariants_hold_for_random_event_sequences(
    seed: int, concurrency: int, k: int, events: list[str]
) -> None:
    rng = random.Random(seed)
    s = FedBuff(
        concurrency=concurrency, buffer_size=k, num_versions=5, time_budget=50.0, max_staleness=2, max_task_failures=99
    )
    sites = {"a", "b", "c"}
    outstanding: dict[str, Dispatch] = {}
    published = 0
    acts = s.start({"w": torch.zeros(2)}, sorted(sites), 0.0)
    for i, ev in enumerate([*events, "end"]):
        for a in acts:
            if isinstance(a, Dispatch):
                assert a.version == s.version or s.state()["phase"] == "evaluate"
                assert all(o.site != a.site for o in outstanding.values()), "two tasks at one site"
                outstanding[a.task_id] = a
            elif isinstance(a, Cancel):
                outstanding.pop(a.task_id)
            elif isinstance(a, Publish):
                published += 1
                assert a.version == published
        assert len(outstanding) <= concurrency and s.state()["busy"] == len(outstanding)
        if s.state()["phase"] == "train":  # work-conserving: no free slot while an idle site waits
            assert len(outstanding) == min(concurrency, len(sites)), (sorted(sites), outstanding)
        if s.done or ev == "end":
            break
        now = float(i)
        if ev in ("answer", "fail", "leave") and outstanding:
            task = outstanding.pop(rng.choice(sorted(outstanding)))
            if ev == "answer":
                acts = s.on_update(answer(task, delta(1.0, -1.0), "DIFF"), now)
            elif ev == "fail":
                acts = s.task_failed(task.site, task.task_id, "crash", now)
            else:
                sites.discard(task.site)
                acts = s.site_left(task.site, now)
        elif ev == "join":
            name = f"s{i}"
            sites.add(name)
            acts = s.site_joined(name, now)
        else:
            acts = s.tick(now)
    assert s.version == published <= 5


def test_fixed_seed_simulation_is_reproducible_bit_for_bit() -> None:
    def run(seed: int):
        s = FedBuff(concurrency=3, buffer_size=2, num_versions=8, max_staleness=3, server_momentum=0.5)
        pubs, log = simulate(s, make_model(), ["a", "b", "c", "d", "e"], seed)
        return pubs, log, s.state()

    p1, log1, st1 = run(7)
    p2, log2, st2 = run(7)
    assert len(p1) == 8 and isinstance(log1[-1], Finished)
    assert all(same(x.model, y.model) and x.metrics == y.metrics for x, y in zip(p1, p2, strict=True))
    strip = [(type(a).__name__, getattr(a, "task_id", None)) for a in log1]
    assert strip == [(type(a).__name__, getattr(a, "task_id", None)) for a in log2]
    assert st1 == st2
    p3, _, _ = run(8)
    assert not same(p1[-1].model, p3[-1].model)


def _quadratic(s: FedBuff, steps: int, eta: float, target: torch.Tensor) -> list[torch.Tensor]:
    """One site doing one gradient step on 0.5 * |x - target|^2 per task; returns x per version."""
    models = {0: {"x": torch.zeros_like(target)}}
    (d,) = s.start(models[0], ["a"], 0.0)
    xs = []
    for _ in range(steps):
        x = models[d.version]["x"]
        acts = s.on_update(answer(d, {"x": -eta * (x - target)}, "DIFF"), 1.0)
        for a in acts:
            if isinstance(a, Publish):
                models[a.version] = dict(a.model)
                xs.append(a.model["x"])
        d = of(acts, Dispatch)[0] if of(acts, Dispatch) else d
    return xs


def test_server_momentum_and_adam_move_in_the_expected_direction_on_a_quadratic() -> None:
    target = torch.tensor([3.0, -2.0, 0.5], dtype=torch.float64)

    def strategy(**kw: object) -> FedBuff:
        return FedBuff(concurrency=1, buffer_size=1, num_versions=50, **kw)  # type: ignore[arg-type]

    plain = _quadratic(strategy(), 10, 0.05, target)
    heavy = _quadratic(strategy(server_momentum=0.9), 10, 0.05, target)
    dist = [(xs[-1] - target).norm().item() for xs in (plain, heavy)]
    assert dist[1] < dist[0] < target.norm().item()  # momentum accelerates the descent
    # Adam: the first step is ~lr * sign(delta) per coordinate, whatever the delta's scale.
    adam = _quadratic(strategy(server_optimizer="adam", server_lr=0.1), 10, 1e-4, target)
    torch.testing.assert_close(adam[0], 0.1 * torch.sign(target), rtol=1e-3, atol=0.0)  # eps shifts it a little
    tiny = _quadratic(strategy(), 10, 1e-4, target)
    assert (adam[-1] - target).norm() < (tiny[-1] - target).norm()
    assert torch.all(torch.sign(adam[-1]) == torch.sign(target))


def test_time_budget_finishes_via_tick_and_next_deadline() -> None:
    s, d = started(["a", "b"], num_versions=None, time_budget=60.0, buffer_size=5)
    assert s.next_deadline == 60.0
    assert s.tick(59.0) == []
    s.on_update(answer(d["a"], delta(1.0, 1.0), "DIFF"), 10.0)
    acts = s.tick(60.0)
    assert {c.site for c in of(acts, Cancel)} == {"a", "b"}
    assert acts[-1] == Finished("time budget of 60 s spent at version 0")
    assert s.done and s.next_deadline is None and s.tick(100.0) == []
    (rej,) = s.on_update(answer(d["b"], delta(1.0, 1.0), "DIFF"), 61.0)
    assert isinstance(rej, Rejected)


def test_num_versions_finishes_and_cancels_outstanding_tasks() -> None:
    s, d = started(["a", "b"], buffer_size=1, num_versions=1)
    acts = s.on_update(answer(d["a"], delta(1.0, 1.0), "DIFF"), 1.0)
    assert [type(x) for x in acts] == [Accepted, Publish, Cancel, Finished]
    assert acts[2].site == "b" and acts[-1].reason == "num_versions=1 reached"
    (late,) = s.on_update(answer(d["b"], delta(1.0, 1.0), "DIFF"), 2.0)
    assert isinstance(late, Rejected)


@pytest.mark.parametrize(
    ("params", "ptype", "needle"),
    [({"w": torch.ones(2)}, "FULL", "needs DIFF"), (None, "DIFF", "needs DIFF"),
     ({"w": torch.tensor([math.nan, 0.0])}, "DIFF", "non-finite"),
     ({"w": torch.ones(3)}, "DIFF", "shape mismatch")],
)  # fmt: skip
def test_bad_updates_are_rejected_and_the_site_is_redispatched(params, ptype: str, needle: str) -> None:
    s, d = started(["a"], buffer_size=1)
    acts = s.on_update(answer(d["a"], params, ptype), 1.0)
    assert isinstance(acts[0], Rejected) and needle in acts[0].reason
    assert acts[1:] == [Dispatch("a", "0-a-1", 0)] and s.state()["rejected"] == 1


def test_integer_tensors_in_deltas_are_skipped_and_inputs_not_mutated() -> None:
    model = make_model()
    model0 = clone(model)
    s, d = started(["a"], model, buffer_size=1, server_momentum=0.9)
    upd = like(model, 0.25, counter=100)
    upd0 = clone(upd)
    (pub,) = of(s.on_update(answer(d["a"], upd, "DIFF"), 1.0), Publish)
    assert pub.model["num_batches_tracked"].item() == 5
    torch.testing.assert_close(pub.model["w"], model["w"] + 0.25)
    assert same(model, model0) and same(upd, upd0)
    pub0 = clone(pub.model)
    d2 = Dispatch("a", "1-a-1", 1)
    s.on_update(answer(d2, like(model, 1.0), "DIFF"), 2.0)
    assert same(pub.model, pub0)  # published tensors are never written afterwards


def test_weight_by_samples_averages_by_data_weight() -> None:
    s, d = started(["a", "b"], buffer_size=2, weight_by_samples=True)
    s.on_update(answer(d["a"], delta(4.0, 0.0), "DIFF", weight=1.0), 1.0)
    (pub,) = of(s.on_update(answer(d["b"], delta(0.0, 4.0), "DIFF", weight=3.0), 1.0), Publish)
    assert torch.equal(pub.model["w"], torch.tensor([1.0, 3.0]))


def test_periodic_and_final_evaluation() -> None:
    s, d = started(["a", "b"], buffer_size=1, num_versions=2, evaluate_every=1, eval_timeout=5.0)
    acts = s.on_update(answer(d["a"], delta(1.0, 1.0), "DIFF"), 1.0)  # v1: both sites owe an evaluation
    assert acts[-1] == Dispatch("a", "1-a-2", 1, "evaluate")
    (ev,) = s.on_update(answer(acts[-1], None, metrics={"acc": 0.5}), 2.0)[:1]
    assert ev == Evaluated(1, "a", {"acc": 0.5})
    acts = s.on_update(answer(d["b"], delta(1.0, 1.0), "DIFF"), 3.0)  # v2 = last: final evaluation
    assert [type(x) for x in acts] == [Accepted, Publish, Cancel, Dispatch, Dispatch]
    assert [(x.kind, x.version) for x in of(acts, Dispatch)] == [("evaluate", 2)] * 2
    assert s.next_deadline == 8.0
    s.on_update(answer(of(acts, Dispatch)[1], None, metrics={"acc": 0.9}), 4.0)
    done = s.tick(8.0)
    assert isinstance(done[-1], Finished) and "1 of 2 sites reported" in done[-1].reason


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"concurrency": 0}, "concurrency"), ({"buffer_size": 0}, "buffer_size"),
     ({"server_lr": 0.0}, "server_lr"), ({"server_momentum": 1.0}, "server_momentum"),
     ({"server_optimizer": "rmsprop"}, "server_optimizer"), ({"max_staleness": -1}, "max_staleness"),
     ({"staleness": "linear"}, "staleness"), ({"staleness_kwargs": {"q": 1}}, "no argument 'q'"),
     ({"num_versions": None}, "stop condition"), ({"time_budget": -5.0}, "time_budget"),
     ({"server_optimizer": "adam", "server_momentum": 0.5}, "adam_betas"),
     ({"server_optimizer": "adam", "adam_betas": (0.9,)}, "adam_betas"),
     ({"weight_by_samples": 1}, "weight_by_samples")],
)  # fmt: skip
def test_constructor_validation_names_the_argument(kwargs: dict[str, object], needle: str) -> None:
    base = {"concurrency": 2, "buffer_size": 2, "num_versions": 3, **kwargs}
    with pytest.raises(ConfigError) as err:
        FedBuff(**base)  # type: ignore[arg-type]
    assert needle in str(err.value)


def test_a_site_whose_tasks_keep_failing_is_benched_until_it_rejoins() -> None:
    s, d = started(["a", "b"], max_task_failures=2, buffer_size=10)
    assert s.params_type == "DIFF"
    (again,) = s.task_failed("a", d["a"].task_id, "crash", 1.0)
    assert isinstance(again, Dispatch) and again.site == "a"  # one failure: retried at once
    assert s.task_failed("a", again.task_id, "crash", 2.0) == []  # benched: b keeps training alone
    acts = s.on_update(answer(d["b"], delta(0.0, 0.0), "DIFF"), 3.0)
    assert [x.site for x in of(acts, Dispatch)] == ["b"]
    s.site_left("a", 4.0)
    assert [x.site for x in s.site_joined("a", 5.0)] == ["a"]  # back with a clean slate


def test_a_task_lost_to_a_restart_of_the_site_does_not_count_toward_benching_it() -> None:
    s, d = started(["a"], max_task_failures=1)
    (again,) = s.task_failed("a", d["a"].task_id, "the site restarted and lost the task", 1.0, blame=False)
    assert isinstance(again, Dispatch) and again.site == "a" and not s.done
    assert s.state()["failed_tasks"] == 1
    acts = s.task_failed("a", again.task_id, "crash", 2.0)  # the next failure is its own: benched, the job fails
    assert isinstance(acts[0], Failed) and "crash" in acts[0].reason


def test_the_job_fails_when_every_site_is_benched() -> None:
    s, d = started(["a"], max_task_failures=1)
    acts = s.task_failed("a", d["a"].task_id, "ImportError: torchvision", 1.0)
    assert len(acts) == 1 and isinstance(acts[0], Failed) and s.done
    assert "ImportError: torchvision" in acts[0].reason


def test_restore_refolds_accepted_updates_exactly_as_on_update_did() -> None:
    """A broker restarted from checkpoint v0 hands back, in order, the updates the dead one had accepted: the
    rebuilt versions and the buffer are the ones the uninterrupted strategy reached, staleness and all."""
    model = {"w": torch.tensor([1.0, -2.0, 0.5])}
    kw = {"buffer_size": 3, "staleness": "polynomial"}
    live, d = started(["a", "b", "c", "e"], model, **kw)
    accepted: list[tuple[Update, Accepted]] = []
    g = torch.Generator().manual_seed(3)
    for site in ["a", "b", "c", "a", "c"]:  # v1 after three; then a (base 0, s=1) and c (base 1, s=0) wait
        up = answer(d[site], {"w": torch.randn(3, generator=g)}, "DIFF", weight=2.0, metrics={"loss": 1.0})
        acts = live.on_update(up, 1.0)
        accepted += [(up, a) for a in of(acts, Accepted)]
        d.update({x.site: x for x in of(acts, Dispatch)})
    assert live.version == 1 and live.state()["buffered"] == 2
    assert [a.staleness for _, a in accepted] == [0, 0, 0, 1, 0]

    restarted, rd = started(["a", "b", "c", "e"], model, **kw)
    rebuilt = []
    for up, acc in accepted:
        acts = restarted.restore(up)
        assert of(acts, Accepted) == [acc]  # same staleness, same coefficient
        rebuilt += of(acts, Publish)
    assert [p.version for p in rebuilt] == [1] and same(rebuilt[0].model, live.model)
    assert restarted.state()["buffered"] == 2 and restarted.state()["accepted"] == 5

    last = {"w": torch.tensor([0.25, 0.25, 0.25])}  # the next live result applies both buffers identically
    (p1,) = of(live.on_update(answer(d["e"], last, "DIFF"), 2.0), Publish)
    (p2,) = of(restarted.on_update(answer(rd["e"], last, "DIFF"), 2.0), Publish)
    assert p1.version == p2.version == 2 and same(p1.model, p2.model)
    assert p2.metrics["strategy/num_updates"] == 3.0


def test_restore_refuses_what_cannot_be_folded_again() -> None:
    s, _ = started(["a"], buffer_size=2, max_staleness=0)
    with pytest.raises(StrategyError, match="start"):
        FedBuff(concurrency=1, buffer_size=1, num_versions=1).restore(Update("a", "t", 0, delta(1.0, 1.0), "DIFF"))
    (rej,) = s.restore(Update("a", "t1", 3, delta(1.0, 1.0), "DIFF"))
    assert isinstance(rej, Rejected) and "version 3, which the broker lost" in rej.reason
    (rej,) = s.restore(Update("a", "t2", 0, {"w": torch.tensor([float("nan"), 0.0])}, "DIFF"))
    assert isinstance(rej, Rejected) and "non-finite" in rej.reason
    assert of(s.restore(Update("a", "t3", 0, delta(1.0, 1.0), "DIFF")), Accepted)
    assert s.state()["buffered"] == 1 and s.state()["rejected"] == 2
