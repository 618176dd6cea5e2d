"""SCAFFOLD: weights and control variates aggregated from DIFF results, checked against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from fedbus.client.constants import SCAFFOLD_PREFIX as CLIENT_PREFIX
from fedbus.errors import ConfigError, StrategyError
from fedbus.strategy import SCAFFOLD_PREFIX, Dispatch, Publish, Rejected, Scaffold, make_strategy

from .helpers import answer, of

C = SCAFFOLD_PREFIX


def tiny() -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5]), "n": torch.tensor(3)}


def result(w: list[float], b: list[float], cw: list[float], cb: list[float]) -> dict[str, torch.Tensor]:
    """A site's DIFF: weight deltas, an untouched counter, and control deltas under the published names."""
    return {
        "w": torch.tensor(w),
        "b": torch.tensor(b),
        "n": torch.tensor(0),
        C + "w": torch.tensor(cw),
        C + "b": torch.tensor(cb),
    }


def started(sites: list[str], **kw: object) -> tuple[Scaffold, dict[str, Dispatch]]:
    s = Scaffold(**{"min_clients": 2, "num_rounds": 3, **kw})  # type: ignore[arg-type]
    return s, {d.site: d for d in of(s.start(tiny(), sites, now=0.0), Dispatch)}


def test_prefix_is_the_client_literal_and_options_ask_for_scaffold() -> None:
    assert SCAFFOLD_PREFIX == CLIENT_PREFIX == "scaffold.c."
    s = Scaffold(min_clients=1, num_rounds=1)
    assert s.client_options() == {"scaffold": True} and s.params_type == "DIFF"


def test_start_adds_zero_controls_for_floating_weights_only() -> None:
    s, _ = started(["a", "b"])
    assert sorted(s.model) == ["b", "n", C + "b", C + "w", "w"]
    assert torch.equal(s.model[C + "w"], torch.zeros(2)) and torch.equal(s.model[C + "b"], torch.zeros(1))


def test_one_round_matches_the_hand_computed_server_step() -> None:
    s, d = started(["a", "b", "c"], server_lr=0.5)  # N = 3 sites, 2 of them answer
    s.on_update(answer(d["a"], result([1.0, -1.0], [2.0], [0.3, 0.6], [0.9]), "DIFF", weight=1.0), 1.0)
    s.on_update(answer(d["b"], result([3.0, 1.0], [-2.0], [0.6, 0.0], [0.3]), "DIFF", weight=3.0), 2.0)
    (pub,) = of(s.task_failed("c", d["c"].task_id, "crashed", 3.0), Publish)
    m = pub.model
    # x += 0.5 * (1 * dy_a + 3 * dy_b) / 4:  w = [1, 2] + 0.5 * [10/4, 2/4];  b = 0.5 + 0.5 * (2 - 6) / 4
    assert_close(m["w"], torch.tensor([2.25, 2.25]))
    assert_close(m["b"], torch.tensor([0.0]))
    # c += (|S| / N) * mean(dc) = (dc_a + dc_b) / 3:  c_w = [0.9, 0.6] / 3;  c_b = 1.2 / 3
    assert_close(m[C + "w"], torch.tensor([0.3, 0.2]))
    assert_close(m[C + "b"], torch.tensor([0.4]))
    assert m["n"].item() == 3  # deltas leave integer counters alone
    assert pub.metrics["strategy/num_updates"] == 2.0


def test_controls_accumulate_over_rounds() -> None:
    s, d = started(["a", "b", "c"])
    for site, cw in (("a", [0.3, 0.6]), ("b", [0.6, 0.0]), ("c", [0.0, 0.0])):
        acts = s.on_update(answer(d[site], result([0.0, 0.0], [0.0], cw, [0.0]), "DIFF"), 1.0)
    d = {x.site: x for x in of(acts, Dispatch)}
    for site, cw in (("a", [0.3, 0.3]), ("b", [0.0, 0.0]), ("c", [0.6, 0.0])):
        acts = s.on_update(answer(d[site], result([0.0, 0.0], [0.0], cw, [0.0]), "DIFF"), 2.0)
    (pub,) = of(acts, Publish)
    # round 1: [0.9, 0.6] / 3 = [0.3, 0.2]; round 2 adds [0.9, 0.3] / 3 = [0.3, 0.1]
    assert_close(pub.model[C + "w"], torch.tensor([0.6, 0.3]))
    assert_close(pub.model["w"], torch.tensor([1.0, 2.0]))  # zero weight deltas: x unchanged


def test_n_counts_sites_that_joined_after_start() -> None:
    s, d = started(["a", "b"])
    s.site_joined("d", 0.5)  # a job site that came late: it trains from the next round, but counts in N
    assert s.num_sites == 3
    s.on_update(answer(d["a"], result([0.0, 0.0], [0.0], [0.3, 0.3], [0.0]), "DIFF"), 1.0)
    (pub,) = of(s.on_update(answer(d["b"], result([0.0, 0.0], [0.0], [0.3, 0.3], [0.0]), "DIFF"), 1.0), Publish)
    assert_close(pub.model[C + "w"], torch.tensor([0.2, 0.2]))  # [0.6, 0.6] / 3


def test_full_results_and_missing_controls_are_rejected() -> None:
    s, d = started(["a", "b", "c"], min_clients=1)
    (rej,) = s.on_update(answer(d["a"], result([0.0, 0.0], [0.0], [0.0, 0.0], [0.0]), "FULL"), 1.0)
    assert isinstance(rej, Rejected) and "DIFF" in rej.reason
    no_controls = {"w": torch.zeros(2), "b": torch.zeros(1), "n": torch.tensor(0)}
    (rej,) = s.on_update(answer(d["b"], no_controls, "DIFF"), 1.0)
    assert isinstance(rej, Rejected) and "missing tensors" in rej.reason and C in rej.reason


def test_a_checkpoint_with_controls_resumes_them() -> None:
    s = Scaffold(min_clients=1, num_rounds=5)
    ckpt = {**tiny(), C + "w": torch.tensor([0.1, 0.2]), C + "b": torch.tensor([0.3])}
    (disp,) = of(s.start(ckpt, ["a"], now=0.0, version=2), Dispatch)
    assert disp.version == 2 and torch.equal(s.model[C + "w"], torch.tensor([0.1, 0.2]))
    (pub,) = of(s.on_update(answer(disp, result([1.0, 1.0], [1.0], [0.5, 0.5], [0.5]), "DIFF"), 1.0), Publish)
    assert_close(pub.model["w"], torch.tensor([2.0, 3.0]))
    assert_close(pub.model[C + "w"], torch.tensor([0.6, 0.7]))  # N = 1: c += dc
    assert torch.equal(ckpt[C + "w"], torch.tensor([0.1, 0.2]))  # the caller's tensors are not written


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({C + "v": torch.zeros(2)}, "has no floating weight 'v'"),
        ({C + "n": torch.tensor(0)}, "has no floating weight 'n'"),
        ({C + "w": torch.zeros(3)}, "must match its weight's shape and dtype"),
    ],
)
def test_a_control_without_its_weight_is_refused(extra: dict[str, torch.Tensor], needle: str) -> None:
    with pytest.raises(StrategyError, match=needle):
        Scaffold(min_clients=1, num_rounds=1).start({**tiny(), **extra}, ["a"], now=0.0)


def test_arguments_are_checked_by_name() -> None:
    with pytest.raises(ConfigError, match="Scaffold: server_lr must be a finite number > 0"):
        Scaffold(min_clients=1, num_rounds=1, server_lr=0)
    assert isinstance(make_strategy("scaffold", min_clients=2, num_rounds=1, server_lr=1), Scaffold)
