"""The plain aggregation arithmetic, validation, staleness functions and the strategy registry."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import fedbus.strategy as strategy_pkg
from fedbus.errors import ConfigError, StrategyError
from fedbus.strategy import (
    FedAvg,
    FedBuff,
    MetricMean,
    constant,
    finalize_mean,
    hinge,
    make_staleness_fn,
    make_strategy,
    polynomial,
    validate_update,
    weighted_sum_into,
)
from fedbus.strategy.base import clean_metrics

from .helpers import clone, make_model, same


def test_weighted_mean_matches_hand_computation() -> None:
    acc: dict[str, torch.Tensor] = {}
    weighted_sum_into(acc, {"w": torch.tensor([1.0, 2.0])}, 1.0)
    weighted_sum_into(acc, {"w": torch.tensor([3.0, 6.0])}, 3.0)
    mean = finalize_mean(acc, 4.0)
    assert torch.equal(mean["w"], torch.tensor([2.5, 5.0]))


@settings(max_examples=25, deadline=None)
@given(
    weights=st.lists(st.floats(0.01, 1000.0), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_weighted_mean_matches_float64_reference(weights: list[float], seed: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(seed)
    updates = [{"a": torch.randn(4, 3, generator=g, dtype=dtype)} for _ in weights]
    acc: dict[str, torch.Tensor] = {}
    for u, w in zip(updates, weights, strict=True):
        weighted_sum_into(acc, u, w)
    got = finalize_mean(acc, sum(weights))["a"]
    stacked = torch.stack([u["a"].double() for u in updates])
    ref = (stacked * torch.tensor(weights, dtype=torch.float64).view(-1, 1, 1)).sum(0) / sum(weights)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


def test_inputs_are_not_mutated() -> None:
    a, b = make_model(1), make_model(2)
    a0, b0 = clone(a), clone(b)
    acc: dict[str, torch.Tensor] = {}
    weighted_sum_into(acc, a, 2.0)
    weighted_sum_into(acc, b, 3.0)
    finalize_mean(acc, 5.0)
    assert same(a, a0) and same(b, b0)
    assert all(acc[k].data_ptr() != a[k].data_ptr() for k in acc)


def test_integer_and_bool_tensors_take_the_max_or_are_skipped() -> None:
    acc: dict[str, torch.Tensor] = {}
    weighted_sum_into(acc, {"n": torch.tensor(7), "m": torch.tensor([True, False])}, 0.5)
    weighted_sum_into(acc, {"n": torch.tensor(3), "m": torch.tensor([False, True])}, 2.0)
    mean = finalize_mean(acc, 2.5)
    assert mean["n"].item() == 7 and mean["n"].dtype == torch.int64
    assert mean["m"].tolist() == [True, True]
    skipped: dict[str, torch.Tensor] = {}
    weighted_sum_into(skipped, {"n": torch.tensor(7), "x": torch.ones(2)}, 1.0, integers="skip")
    assert list(skipped) == ["x"]


def test_finalize_mean_refuses_a_zero_total() -> None:
    with pytest.raises(StrategyError):
        finalize_mean({"w": torch.ones(1)}, 0.0)


def test_metric_mean_is_weighted_per_key() -> None:
    m = MetricMean()
    m.add({"loss": 1.0, "acc": 0.5}, 1.0)
    m.add({"loss": 3.0}, 3.0)
    assert m.result() == {"loss": 2.5, "acc": 0.5}


def test_clean_metrics_keeps_finite_reals_only() -> None:
    raw = {"loss": 1, "nan": math.nan, "inf": math.inf, "s": "x", "flag": True, 3: 1.0}
    assert clean_metrics(raw) == {"loss": 1.0}
    assert clean_metrics(None) == {}


# ---- validate_update ----------------------------------------------------------------------------------

REF = {"w": torch.zeros(2, 3), "n": torch.tensor(0)}


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"w": torch.zeros(2, 3)}, "missing tensors: ['n']"),
        ({**REF, "extra": torch.zeros(1)}, "unexpected tensors: ['extra']"),
        ({"w": torch.zeros(3, 2), "n": torch.tensor(0)}, "shape mismatch for 'w'"),
        ({"w": torch.zeros(2, 3, dtype=torch.float64), "n": torch.tensor(0)}, "dtype mismatch for 'w'"),
        ({"w": torch.full((2, 3), math.nan), "n": torch.tensor(0)}, "non-finite"),
        ({"w": torch.full((2, 3), -math.inf), "n": torch.tensor(0)}, "non-finite"),
        ({"w": [[0.0] * 3] * 2, "n": torch.tensor(0)}, "is not a tensor"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_validate_update_names_the_problem(params: object, needle: str) -> None:
    reason = validate_update(REF, params)  # type: ignore[arg-type]
    assert reason is not None and needle in reason


def test_validate_update_accepts_a_matching_update() -> None:
    assert validate_update(REF, {"w": torch.ones(2, 3), "n": torch.tensor(-4)}) is None


def test_validate_update_truncates_long_name_lists() -> None:
    reason = validate_update(REF, {**REF, **{f"x{i}": torch.zeros(1) for i in range(100)}})
    assert reason is not None and "95 more" in reason and len(reason) < 200


# ---- staleness functions ------------------------------------------------------------------------------


def test_staleness_function_values() -> None:
    assert [constant(s) for s in (0, 1, 50)] == [1.0, 1.0, 1.0]
    assert polynomial(0) == 1.0
    assert polynomial(3) == pytest.approx(0.5)  # 1 / sqrt(1 + 3)
    assert polynomial(3, a=1.0) == pytest.approx(0.25)
    assert [hinge(s) for s in (0, 4)] == [1.0, 1.0]
    assert hinge(5) == pytest.approx(1 / 11)  # 1 / (10 * (5 - 4) + 1)
    assert hinge(6, a=1.0, b=4.0) == pytest.approx(1 / 3)


def test_make_staleness_fn_resolves_names_and_checks_arguments() -> None:
    assert make_staleness_fn("polynomial", a=1.0)(3) == pytest.approx(0.25)
    assert make_staleness_fn("hinge", a=1, b=2)(4) == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match="unknown staleness function 'poly'"):
        make_staleness_fn("poly")
    with pytest.raises(ConfigError, match="no argument 'c'"):
        make_staleness_fn("hinge", c=1.0)
    with pytest.raises(ConfigError, match="'a' must be"):
        make_staleness_fn("polynomial", a=-1.0)


# ---- registry ------------------------------------------------------------------------------------------


def test_make_strategy_builds_registered_strategies() -> None:
    assert isinstance(make_strategy("fedavg", min_clients=1, num_rounds=2), FedAvg)
    assert isinstance(make_strategy("FedBuff", concurrency=2, buffer_size=2, num_versions=3), FedBuff)


@pytest.mark.parametrize(
    ("name", "kwargs", "needle"),
    [
        ("fedbuf", {}, "unknown strategy 'fedbuf' (did you mean 'fedbuff'?)"),
        ("fedbuff", {"concurency": 2}, "no argument 'concurency' (did you mean 'concurrency'?)"),
        ("fedavg", {"min_clients": 2}, "needs argument(s): num_rounds"),
        ("fedavg", {"min_clients": 0, "num_rounds": 1}, "min_clients must be an integer >= 1"),
        ("fedavg", {"min_clients": "2", "num_rounds": 1}, "min_clients"),
        ("fedbuff", {"concurrency": 2, "buffer_size": 0, "num_versions": 1}, "buffer_size"),
        ("fedbuff", {"concurrency": True, "buffer_size": 1, "num_versions": 1}, "concurrency"),
    ],
)
def test_make_strategy_explains_config_errors(name: str, kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_strategy(name, **kwargs)
    assert needle in str(err.value)


def test_public_api_is_pinned() -> None:
    assert set(strategy_pkg.__all__) == {
        "SCAFFOLD_PREFIX", "STALENESS_FUNCTIONS", "STRATEGIES", "Accepted", "Action", "Cancel", "CrossSiteEval",
        "Cyclic", "Dispatch", "Evaluated", "Failed", "FedAvg", "FedAvgLr", "FedBuff", "FedEval", "FedOpt", "FedProx",
        "Finished", "MetricMean", "Publish", "Rejected", "Scaffold", "ServerAdagrad", "ServerAdam",
        "ServerOptimizer", "ServerSGD", "ServerYogi", "Strategy", "Update", "constant", "finalize_mean", "hinge",
        "make_staleness_fn", "make_strategy", "polynomial", "resolve_strategy_class", "validate_update",
        "weighted_sum_into",
    }  # fmt: skip
    assert all(hasattr(strategy_pkg, name) for name in strategy_pkg.__all__)
