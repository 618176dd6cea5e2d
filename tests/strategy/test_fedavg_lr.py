"""FedAvgLr: a damped Newton step from the sites' gradient and Hessian, on hand-computed 2x2 systems."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from fedbus.errors import ConfigError, StrategyError
from fedbus.strategy import Dispatch, Failed, FedAvgLr, Publish, Rejected, make_strategy

from .helpers import answer, of

F64 = torch.float64


def theta0() -> dict[str, torch.Tensor]:
    return {"numpy_key": torch.zeros(2, 1)}  # num_features = 1: intercept + one weight, float32 as FLARE's


def stats(g: list[float], h: list[list[float]], dtype: torch.dtype = F64) -> dict[str, torch.Tensor]:
    return {"gradient": torch.tensor(g, dtype=dtype).reshape(2, 1), "hessian": torch.tensor(h, dtype=dtype)}


def start(sites: list[str], **kw: object) -> tuple[FedAvgLr, dict[str, Dispatch]]:
    s = FedAvgLr(**{"min_clients": len(sites), "num_rounds": 3, "num_features": 1, **kw})  # type: ignore[arg-type]
    return s, {d.site: d for d in of(s.start(theta0(), sites, now=0.0), Dispatch)}


def test_declares_its_inputs() -> None:
    s = FedAvgLr(min_clients=1, num_rounds=1, num_features=13)
    assert s.input_spec() == {"gradient": (F64, (14, 1)), "hessian": (F64, (14, 14))}
    ref = s.input_reference()
    assert ref["hessian"].is_meta and ref["hessian"].shape == (14, 14) and ref["gradient"].dtype == F64
    assert FedAvgLr(min_clients=1, num_rounds=1, num_features=2, input_dtype="float32").input_spec() == {
        "gradient": (torch.float32, (3, 1)),
        "hessian": (torch.float32, (3, 3)),
    }


def test_weighted_mean_newton_step_with_regularization() -> None:
    s, d = start(["a", "b"], damping_factor=0.8, epsilon=1.0)
    s.on_update(answer(d["a"], stats([1.0, 2.0], [[2.0, 0.0], [0.0, 1.0]]), weight=1.0), 1.0)
    (pub,) = of(s.on_update(answer(d["b"], stats([3.0, 0.0], [[2.0, 0.0], [0.0, 3.0]]), weight=3.0), 2.0), Publish)
    # g = (1 [1, 2] + 3 [3, 0]) / 4 = [2.5, 0.5];  H = diag((2 + 6) / 4, (1 + 9) / 4) = diag(2, 2.5)
    # theta = 0 + 0.8 * (H + I)^-1 g = 0.8 * [2.5 / 3, 0.5 / 3.5]
    assert pub.model["numpy_key"].dtype == torch.float32  # the model keeps its dtype
    assert_close(pub.model["numpy_key"], torch.tensor([[2.0 / 3.0], [0.8 / 7.0]]))


def test_two_rounds_of_undamped_newton_on_a_coupled_system() -> None:
    s, d = start(["a"], damping_factor=1.0, epsilon=0.0)
    acts = s.on_update(answer(d["a"], stats([3.0, 3.0], [[2.0, 1.0], [1.0, 2.0]])), 1.0)
    (pub,) = of(acts, Publish)
    assert_close(pub.model["numpy_key"], torch.tensor([[1.0], [1.0]]))  # 2x + y = 3, x + 2y = 3
    (d1,) = of(acts, Dispatch)
    assert d1.version == 1
    (pub,) = of(s.on_update(answer(d1, stats([0.0, 3.0], [[2.0, 1.0], [1.0, 2.0]])), 2.0), Publish)
    assert_close(pub.model["numpy_key"], torch.tensor([[0.0], [3.0]]))  # step (-1, 2): 2x + y = 0, x + 2y = 3


def test_equal_sites_match_newton_on_the_pooled_data() -> None:
    """Sites computing FLARE's client statistics on halves of one data set: one federated step with damping 1 and
    epsilon 0 is the centralized Newton step."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.ones(40, 1, dtype=F64), torch.randn(40, 1, generator=g, dtype=F64)], dim=1)
    y = (torch.rand(40, 1, generator=g, dtype=F64) < 0.5).to(F64)
    theta = torch.tensor([[0.2], [-0.3]], dtype=F64)

    def site_stats(xs: torch.Tensor, ys: torch.Tensor) -> dict[str, torch.Tensor]:
        p = torch.sigmoid(xs @ theta)
        return {"gradient": xs.T @ (ys - p), "hessian": xs.T @ (xs * (p * (1 - p)))}

    s = FedAvgLr(min_clients=2, num_rounds=1, num_features=1, epsilon=0.0)
    d = {x_.site: x_ for x_ in of(s.start({"numpy_key": theta.clone()}, ["a", "b"], now=0.0), Dispatch)}
    s.on_update(answer(d["a"], site_stats(x[:20], y[:20]), weight=20.0), 1.0)
    (pub,) = of(s.on_update(answer(d["b"], site_stats(x[20:], y[20:]), weight=20.0), 1.0), Publish)
    pooled = site_stats(x, y)
    expected = theta + torch.linalg.solve(pooled["hessian"], pooled["gradient"])
    assert_close(pub.model["numpy_key"], expected)


@pytest.mark.parametrize(
    ("params", "kind", "needle"),
    [
        (stats([1.0, 1.0], [[1.0, 0.0], [0.0, 1.0]]), "DIFF", "needs FULL results"),
        (stats([1.0, 1.0], [[1.0, 0.0], [0.0, 1.0]], torch.float32), "FULL", "dtype mismatch for 'gradient'"),
        ({"gradient": torch.zeros(2, 1, dtype=F64), "hessian": torch.zeros(3, 3, dtype=F64)}, "FULL", "shape"),
        ({"numpy_key": torch.zeros(2, 1)}, "FULL", "missing tensors"),
        (stats([1.0, 1.0], [[1.0, 5.0], [0.0, 1.0]]), "FULL", "'hessian' must be symmetric"),
        (stats([float("inf"), 1.0], [[1.0, 0.0], [0.0, 1.0]]), "FULL", "non-finite"),
    ],
)
def test_results_are_checked_against_the_declared_inputs(params: dict, kind: str, needle: str) -> None:
    s, d = start(["a", "b"], min_clients=1)
    (rej,) = s.on_update(answer(d["a"], params, kind), 1.0)
    assert isinstance(rej, Rejected) and needle in rej.reason


def test_a_singular_system_fails_the_round() -> None:
    s, d = start(["a"], epsilon=0.0)
    (end,) = of(s.on_update(answer(d["a"], stats([1.0, 1.0], [[0.0, 0.0], [0.0, 0.0]])), 1.0), Failed)
    assert "round 1" in end.reason and "singular" in end.reason


def test_the_model_must_be_the_weight_column() -> None:
    with pytest.raises(StrategyError, match=r"'numpy_key' must have shape \(3, 1\) for num_features=2"):
        FedAvgLr(min_clients=1, num_rounds=1, num_features=2).start(theta0(), ["a"], now=0.0)
    with pytest.raises(StrategyError, match="the model must be"):
        FedAvgLr(min_clients=1, num_rounds=1, num_features=1).start({"w": torch.zeros(2, 1)}, ["a"], now=0.0)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"num_features": 0}, "FedAvgLr: num_features must be an integer >= 1"),
        ({"num_features": 1, "damping_factor": 0}, "FedAvgLr: damping_factor must be"),
        ({"num_features": 1, "epsilon": -1}, "FedAvgLr: epsilon must be"),
        ({"num_features": 1, "input_dtype": "float16"}, "FedAvgLr: input_dtype must be one of"),
        ({}, "needs argument(s): num_features"),
    ],
)
def test_arguments_are_checked_by_name(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_strategy("fedavg_lr", min_clients=1, num_rounds=1, **kw)
    assert needle in str(err.value)
