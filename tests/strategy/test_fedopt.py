"""FedOpt: FedAvg's barrier, then a server optimizer on the weighted mean update (hand-computed)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from fedbus.errors import ConfigError
from fedbus.strategy import Dispatch, FedOpt, Publish, make_strategy

from .helpers import answer, of


def start(sites: list[str], **kw: object) -> tuple[FedOpt, dict[str, Dispatch]]:
    s = FedOpt(**{"min_clients": len(sites), "num_rounds": 3, **kw})  # type: ignore[arg-type]
    model = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    return s, {d.site: d for d in of(s.start(model, sites, now=0.0), Dispatch)}


def diff(w: list[float]) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(w), "n": torch.tensor(0)}


def round_of(s: FedOpt, d: dict[str, Dispatch], results: dict[str, tuple[list[float], float]], kind: str = "DIFF"):
    acts = []
    for site, (w, weight) in results.items():
        params = diff(w) if kind == "DIFF" else {"w": torch.tensor(w), "n": torch.tensor(5)}
        acts = s.on_update(answer(d[site], params, kind, weight=weight), 1.0)
    (pub,) = of(acts, Publish)
    return pub, {x.site: x for x in of(acts, Dispatch)}


def test_sgd_lr_one_is_fedavg() -> None:
    s, d = start(["a", "b"])
    pub, _ = round_of(s, d, {"a": ([1.0, 0.0], 1.0), "b": ([0.0, 2.0], 1.0)})
    assert_close(pub.model["w"], torch.tensor([1.5, 3.0]))  # [1, 2] + mean([1, 0], [0, 2])
    assert s.params_type == "DIFF" and s.state()["strategy"] == "fedopt"


def test_sgd_momentum_over_two_rounds() -> None:
    s, d = start(["a"], server_lr=2.0, server_momentum=0.5)
    pub, d = round_of(s, d, {"a": ([1.0, -1.0], 4.0)})  # v = [1, -1]; x = [1, 2] + 2 v = [3, 0]
    assert_close(pub.model["w"], torch.tensor([3.0, 0.0]))
    pub, _ = round_of(s, d, {"a": ([1.0, 1.0], 4.0)})  # v = 0.5 [1, -1] + [1, 1] = [1.5, 0.5]; x += 2 v
    assert_close(pub.model["w"], torch.tensor([6.0, 1.0]))
    assert pub.model["n"].item() == 3  # DIFF results leave the counter alone


def test_full_results_make_the_delta_from_the_weighted_mean() -> None:
    s, d = start(["a", "b"], server_lr=0.5)
    pub, _ = round_of(s, d, {"a": ([2.0, 2.0], 1.0), "b": ([4.0, 6.0], 3.0)}, kind="FULL")
    # mean = (1 [2, 2] + 3 [4, 6]) / 4 = [3.5, 5]; delta = mean - [1, 2] = [2.5, 3]; x += 0.5 delta
    assert_close(pub.model["w"], torch.tensor([2.25, 3.5]))
    assert pub.model["n"].item() == 5  # FULL results: the counters' max, as FedAvg


def test_adam_first_step_moves_each_coordinate_by_about_lr() -> None:
    s, d = start(["a", "b"], server_optimizer="adam", server_lr=0.1, betas=[0.5, 0.75], tau=1e-8)
    pub, _ = round_of(s, d, {"a": ([2.0, -4.0], 1.0), "b": ([2.0, -4.0], 1.0)})
    # m_hat = delta, v_hat = delta^2: x += 0.1 * delta / |delta|
    assert_close(pub.model["w"], torch.tensor([1.1, 1.9]))


def test_adagrad_and_yogi_first_steps() -> None:
    s, d = start(["a", "b"], server_optimizer="adagrad", server_lr=1.0, betas=(0.0, 0.9), tau=1e-3)
    pub, _ = round_of(s, d, {"a": ([2.0, -4.0], 1.0), "b": ([4.0, -4.0], 2.0)})
    # delta = (1 [2, -4] + 2 [4, -4]) / 3 = [10/3, -4]; m = delta; v = delta^2
    assert_close(pub.model["w"], torch.tensor([1.0 + (10 / 3) / (10 / 3 + 1e-3), 2.0 - 4 / (4 + 1e-3)]))
    s, d = start(["a"], server_optimizer="yogi", server_lr=0.5, betas=(0.5, 0.75), tau=1e-3)
    pub, _ = round_of(s, d, {"a": ([2.0, -4.0], 1.0)})
    # m = 0.5 delta = [1, -2]; v = 0.25 delta^2 = [1, 4]; x += 0.5 m / (sqrt(v) + tau)
    assert_close(pub.model["w"], torch.tensor([1.0 + 0.5 * 1 / 1.001, 2.0 - 0.5 * 2 / 2.001]))


def test_cosine_schedule_follows_torch_cosine_annealing() -> None:
    s = FedOpt(min_clients=1, num_rounds=4, lr_schedule="cosine", server_lr=1.0, server_lr_min=0.5)
    assert [s.lr_at(t) for t in (0, 2, 4)] == pytest.approx([1.0, 0.75, 0.5])
    assert s.lr_at(1) == pytest.approx(0.5 + 0.5 * (1 + math.cos(math.pi / 4)) / 2)
    s, d = start(["a"], num_rounds=2, lr_schedule="cosine")  # lr 1 then (1 + cos(pi / 2)) / 2 = 0.5
    pub, d = round_of(s, d, {"a": ([1.0, 1.0], 1.0)})
    assert_close(pub.model["w"], torch.tensor([2.0, 3.0]))
    pub, _ = round_of(s, d, {"a": ([1.0, 1.0], 1.0)})
    assert_close(pub.model["w"], torch.tensor([2.5, 3.5]))


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"server_optimizer": "rmsprop"}, "FedOpt: server_optimizer must be one of"),
        ({"server_optimizer": "adam", "server_momentum": 0.9}, "server_momentum applies to sgd"),
        ({"server_momentum": 1.0}, "server_momentum must be a finite number >= 0 and < 1"),
        ({"betas": [0.9]}, "betas must be two numbers"),
        ({"betas": [0.9, 1.0]}, "betas[1] must be"),
        ({"tau": 0}, "tau must be a finite number > 0"),
        ({"server_lr": -1}, "server_lr must be"),
        ({"lr_schedule": "step"}, "lr_schedule must be one of"),
        ({"lr_schedule": "cosine", "server_lr_min": 2.0}, "server_lr_min must be <= server_lr"),
    ],
)
def test_arguments_are_checked_by_name(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_strategy("fedopt", min_clients=1, num_rounds=1, **kw)
    assert needle in str(err.value)
