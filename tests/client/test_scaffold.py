"""SCAFFOLD's client arithmetic on hand-computed tensors: split, gradient correction, Option II control update."""

from __future__ import annotations

import pytest
import torch

from fedbus.client.constants import SCAFFOLD_PREFIX
from fedbus.client.scaffold import (
    ScaffoldState,
    control_update,
    corrected_gradient,
    optimizer_lr,
    split_controls,
)
from fedbus.errors import ConfigError, JobError

pytestmark = pytest.mark.timeout(30)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_the_prefix_is_the_strategys_literal() -> None:
    assert SCAFFOLD_PREFIX == "scaffold.c."


def test_split_controls_keys_them_by_their_weight() -> None:
    params = {"w": t(1), "b": t(2), "scaffold.c.w": t(3), "scaffold.c.b": t(4)}
    weights, controls = split_controls(params)
    assert list(weights) == ["w", "b"] and weights["w"] is params["w"]
    assert list(controls) == ["w", "b"] and controls["b"] is params["scaffold.c.b"]
    weights, controls = split_controls({"w": params["w"]})
    assert weights == {"w": params["w"]} and controls == {}


def test_corrected_gradient_adds_c_minus_ci() -> None:
    got = corrected_gradient(t(1.0, -2.0), c_global=t(0.5, 0.25), c_local=t(0.125, 1.0))
    assert torch.equal(got, t(1.375, -2.75))  # 1 + 0.5 - 0.125, -2 + 0.25 - 1


def test_control_update_is_option_ii() -> None:
    # c_i+ = c_i - c + (x - y) / (K lr); delta = y - x = (-0.2, 0.4), K = 4, lr = 0.05 -> (x - y)/(K lr) = (1, -2)
    new = control_update(t(0.5, 0.5), t(0.25, -1.0), delta=t(-0.2, 0.4), steps=4, lr=0.05)
    torch.testing.assert_close(new, t(0.5 - 0.25 + 1.0, 0.5 + 1.0 - 2.0))
    with pytest.raises(ConfigError, match="steps > 0"):
        control_update(t(0), t(0), t(0), steps=0, lr=0.1)
    with pytest.raises(ConfigError, match="learning rate > 0"):
        control_update(t(0), t(0), t(0), steps=1, lr=0.0)


def test_state_over_two_rounds_keeps_ci_and_corrects_gradients() -> None:
    state = ScaffoldState()
    assert not state.open
    x = {"w": t(1.0, 2.0), "n": t(5.0)}
    state.begin(x, {"w": t(0.5, -0.5), "n": t(9.0)})
    assert state.open and torch.equal(state.c_local["w"], t(0, 0))  # zeros before the first round
    x["w"].add_(100)  # the script trains the received tensors in place: the state kept its own x
    p = torch.nn.Parameter(t(1.0, 2.0))
    p.grad = t(0.1, 0.1)
    frozen = torch.nn.Parameter(t(3.0), requires_grad=False)
    state.correct([("w", p), ("frozen", frozen)], lr=0.1)
    torch.testing.assert_close(p.grad, t(0.6, -0.4))  # grad + c - 0
    fresh = torch.nn.Parameter(t(0.0, 0.0))  # no gradient yet: it becomes the correction
    state.correct([("w", fresh)], lr=0.3)
    torch.testing.assert_close(fresh.grad, t(0.5, -0.5))
    # y = x + (-0.4, 0.8); K = 2 steps at mean lr 0.2: (x - y)/(K lr) = (1, -2); c_i+ = 0 - c + that
    deltas = state.finish({"w": t(0.6, 2.8), "n": t(123.0)}, is_diff=False)
    assert set(deltas) == {"scaffold.c.w", "scaffold.c.n"}
    torch.testing.assert_close(deltas["scaffold.c.w"], t(-0.5 + 1.0, 0.5 - 2.0))
    assert torch.equal(deltas["scaffold.c.n"], t(0.0))  # never corrected: its control stays
    torch.testing.assert_close(state.c_local["w"], t(0.5, -1.5))
    assert not state.open

    # round 2: c_i is the one kept; the correction is c - c_i; the script sends a DIFF this time
    state.begin({"w": t(0.0, 0.0), "n": t(0.0)}, {"w": t(1.0, 1.0), "n": t(0.0)})
    p = torch.nn.Parameter(t(0.0, 0.0))
    p.grad = t(0.0, 0.0)
    state.correct([("w", p)], lr=0.5)
    torch.testing.assert_close(p.grad, t(1.0 - 0.5, 1.0 + 1.5))
    deltas = state.finish({"w": t(-0.5, 0.25)}, is_diff=True)  # K = 1, lr 0.5: (x - y)/(K lr) = (1, -0.5)
    new = t(0.5 - 1.0 + 1.0, -1.5 - 1.0 - 0.5)
    torch.testing.assert_close(state.c_local["w"], new)
    torch.testing.assert_close(deltas["scaffold.c.w"], new - t(0.5, -1.5))


def test_state_refuses_what_cannot_be_computed() -> None:
    state = ScaffoldState()
    with pytest.raises(JobError, match=r"scaffold\.c\.ghost names no weight"):
        state.begin({"w": t(1)}, {"ghost": t(0)})
    state.begin({"w": t(1)}, {"w": t(0)})
    with pytest.raises(ConfigError, match="ScaffoldHelper"):
        state.finish({"w": t(1)}, is_diff=False)  # no step recorded: no learning rate
    p = torch.nn.Parameter(t(1))
    p.grad = t(0)
    with pytest.raises(ConfigError, match="learning rate > 0"):
        state.correct([("w", p)], lr=float("nan"))
    state.correct([("w", p)], lr=0.1)
    with pytest.raises(ConfigError, match=r"lacks params\['w'\]"):
        state.finish({"other": t(1)}, is_diff=False)


def test_a_control_of_another_shape_starts_again_from_zeros() -> None:
    state = ScaffoldState()
    state.c_local["w"] = t(7.0)
    state.begin({"w": t(1.0, 1.0)}, {"w": t(0.0, 0.0)})
    assert torch.equal(state.c_local["w"], t(0.0, 0.0))


def test_optimizer_lr() -> None:
    net = torch.nn.Linear(2, 1)
    assert optimizer_lr(torch.optim.SGD(net.parameters(), lr=0.05)) == 0.05
    assert optimizer_lr(0.5) == 0.5
    two = torch.optim.SGD([{"params": [net.weight], "lr": 0.1}, {"params": [net.bias], "lr": 0.2}])
    with pytest.raises(ConfigError, match="one learning rate"):
        optimizer_lr(two)
    with pytest.raises(ConfigError, match="number or an optimizer"):
        optimizer_lr("fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_corrections_reach_parameters_on_the_gpu_in_their_dtype() -> None:
    state = ScaffoldState()
    state.begin({"w": t(1.0, 2.0)}, {"w": t(0.5, -0.5)})
    p = torch.nn.Parameter(torch.zeros(2, device="cuda", dtype=torch.bfloat16))
    p.grad = torch.ones(2, device="cuda", dtype=torch.bfloat16)
    state.correct([("w", p)], lr=0.1)
    assert p.grad.device.type == "cuda" and p.grad.dtype == torch.bfloat16
    assert torch.equal(p.grad.float().cpu(), t(1.5, 0.5))
