"""Cyclic: the model relayed through the sites, one published version per visit (values by hand)."""

from __future__ import annotations

import random

import pytest
import torch

from fedbus.errors import ConfigError
from fedbus.strategy import Accepted, Cancel, Cyclic, Dispatch, Failed, Finished, Publish, Rejected, make_strategy

from .helpers import answer, of


def zero() -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([0.0, 0.0]), "n": torch.tensor(1)}


def full(w: list[float], n: int = 1) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(w), "n": torch.tensor(n)}


def test_fixed_relay_publishes_one_version_per_visit() -> None:
    s = Cyclic(num_rounds=2)
    (d,) = s.start(zero(), ["c", "a", "b"], now=0.0)
    assert d == Dispatch("a", d.task_id, 0)  # sorted order: a, b, c
    acts = s.on_update(answer(d, full([1.0, 1.0], n=4)), 1.0)
    (acc,) = of(acts, Accepted)
    (pub,) = of(acts, Publish)
    (d,) = of(acts, Dispatch)
    assert acc.site == "a" and pub.version == 1 and torch.equal(pub.model["w"], torch.tensor([1.0, 1.0]))
    assert pub.model["n"].item() == 4  # FULL: the site's model as it is
    assert (d.site, d.version) == ("b", 1)
    acts = s.on_update(answer(d, {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(0)}, "DIFF"), 2.0)
    (pub,) = of(acts, Publish)
    assert torch.equal(pub.model["w"], torch.tensor([2.0, 3.0])) and pub.model["n"].item() == 4  # DIFF: added
    (d,) = of(acts, Dispatch)
    assert (d.site, d.version) == ("c", 2)
    acts = s.on_update(answer(d, full([5.0, 5.0])), 3.0)
    (d,) = of(acts, Dispatch)
    assert (d.site, d.version) == ("a", 3) and s.state()["round"] == 2  # round 2 starts over
    for site in ("a", "b", "c"):
        assert d.site == site
        acts = s.on_update(answer(d, full([float(d.version), 0.0])), 4.0)
        d = next(iter(of(acts, Dispatch)), d)
    assert [p.version for p in of(acts, Publish)] == [6] and isinstance(acts[-1], Finished)
    assert torch.equal(s.model["w"], torch.tensor([5.0, 0.0])) and s.done


def test_failed_left_and_late_sites_are_skipped() -> None:
    s = Cyclic(num_rounds=2, task_timeout=10.0)
    (d,) = s.start(zero(), ["a", "b", "c"], now=0.0)
    assert s.next_deadline == 10.0
    (d,) = s.task_failed("a", d.task_id, "script crashed", 1.0)
    assert (d.site, d.version) == ("b", 0)  # the model goes on unchanged
    acts = s.on_update(answer(d, full([2.0, 2.0])), 2.0)
    (d,) = of(acts, Dispatch)
    assert (d.site, d.version) == ("c", 1) and s.next_deadline == 12.0
    acts = s.tick(12.0)  # c is late: cancelled, skipped; round 1 had one visit, so round 2 starts
    assert isinstance(acts[0], Cancel) and acts[0].site == "c"
    (d2,) = of(acts, Dispatch)
    assert (d2.site, d2.version) == ("a", 1)
    (rej,) = s.on_update(answer(d, full([9.0, 9.0])), 13.0)
    assert isinstance(rej, Rejected) and rej.reason.startswith("stale")
    (d3,) = s.site_left("a", 14.0)
    assert (d3.site, d3.version) == ("b", 1)
    assert s.state()["skipped"] == 3


def test_a_refused_result_skips_the_site() -> None:
    s = Cyclic(num_rounds=1)
    (d,) = s.start(zero(), ["a", "b"], now=0.0)
    acts = s.on_update(answer(d, {"w": torch.tensor([float("nan"), 0.0]), "n": torch.tensor(1)}), 1.0)
    assert isinstance(acts[0], Rejected) and "non-finite" in acts[0].reason
    (d,) = of(acts, Dispatch)
    assert (d.site, d.version) == ("b", 0)


def test_a_round_where_every_site_was_skipped_fails() -> None:
    s = Cyclic(num_rounds=3)
    (d,) = s.start(zero(), ["a", "b"], now=0.0)
    (d,) = s.task_failed("a", d.task_id, "boom", 1.0)
    (end,) = s.task_failed("b", d.task_id, "boom", 2.0)
    assert isinstance(end, Failed) and "round 1: none of the 2 sites returned a model" in end.reason


def test_random_order_is_reproducible_and_reshuffled_each_round() -> None:
    def orders(seed: int) -> list[list[str]]:
        s = Cyclic(num_rounds=3, order="random", seed=seed)
        (d,) = s.start(zero(), ["a", "b", "c", "d"], now=0.0)
        seen: list[list[str]] = []
        while not s.done:
            if s.state()["position"] == 1:
                seen.append(list(s.state()["order"]))  # type: ignore[arg-type]
            acts = s.on_update(answer(d, full([0.0, 0.0])), 1.0)
            d = next(iter(of(acts, Dispatch)), d)
        return seen

    first = orders(7)
    assert first == orders(7) and len(first) == 3
    for r, order in enumerate(first):
        expected = ["a", "b", "c", "d"]
        random.Random(7 * 1_000_003 + r).shuffle(expected)
        assert order == expected
    assert len({tuple(o) for o in first}) > 1


def test_waits_for_min_clients_then_starts() -> None:
    s = Cyclic(num_rounds=1, min_clients=2)
    assert s.start(zero(), ["a"], now=0.0) == [] and s.state()["phase"] == "waiting"
    (d,) = s.site_joined("b", 1.0)
    assert (d.site, d.version) == ("a", 0)


def test_resume_goes_on_where_the_version_says() -> None:
    s = Cyclic(num_rounds=2)
    (d,) = s.start(zero(), ["a", "b", "c"], now=0.0, version=4)  # round 2, after 1 visit
    assert (d.site, d.version) == ("b", 4)
    (end,) = Cyclic(num_rounds=2).start(zero(), ["a", "b", "c"], now=0.0, version=6)
    assert isinstance(end, Finished)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"num_rounds": 0}, "Cyclic: num_rounds must be an integer >= 1"),
        ({"num_rounds": 1, "order": "sorted"}, "Cyclic: order must be one of"),
        ({"num_rounds": 1, "seed": -1}, "Cyclic: seed must be"),
        ({"num_rounds": 1, "task_timeout": 0}, "Cyclic: task_timeout must be"),
    ],
)
def test_arguments_are_checked_by_name(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_strategy("cyclic", **kw)
    assert needle in str(err.value)
