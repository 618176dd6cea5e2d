"""Server optimizers: the first two steps of each, computed by hand."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from fedbus.strategy import ServerAdagrad, ServerAdam, ServerSGD, ServerYogi


def model() -> dict[str, torch.Tensor]:
    return {"x": torch.tensor([1.0, 2.0]), "n": torch.tensor(7)}


def test_sgd_with_momentum_two_steps() -> None:
    opt, m0 = ServerSGD(lr=2.0, momentum=0.5), model()
    m1 = opt.step(m0, {"x": torch.tensor([1.0, -1.0])})  # v = [1, -1]; x = [1, 2] + 2 v
    assert_close(m1["x"], torch.tensor([3.0, 0.0]))
    m2 = opt.step(m1, {"x": torch.tensor([1.0, 1.0])})  # v = 0.5 [1, -1] + [1, 1] = [1.5, 0.5]
    assert_close(m2["x"], torch.tensor([6.0, 1.0]))
    assert m2["n"] is m0["n"] and torch.equal(m0["x"], torch.tensor([1.0, 2.0]))  # carried over; inputs unread


def test_adam_two_steps_with_bias_correction() -> None:
    opt = ServerAdam(lr=0.1, betas=(0.5, 0.75), eps=0.0)
    m1 = opt.step(model(), {"x": torch.tensor([2.0, -4.0])})
    # m = [1, -2], v = 0.25 [4, 16] = [1, 4]; m_hat = m / 0.5 = [2, -4], v_hat = v / 0.25 = [4, 16]
    assert_close(m1["x"], torch.tensor([1.0 + 0.1 * 2 / 2, 2.0 - 0.1 * 4 / 4]))
    m2 = opt.step(m1, {"x": torch.tensor([2.0, 0.0])})
    # m = 0.5 [1, -2] + 0.5 [2, 0] = [1.5, -1]; v = 0.75 [1, 4] + 0.25 [4, 0] = [1.75, 3]
    # m_hat = m / 0.75 = [2, -4/3]; v_hat = v / (1 - 0.75^2) = v / 0.4375 = [4, 48/7]
    expected = [1.1 + 0.1 * 2 / 2, 1.9 - 0.1 * (4 / 3) / math.sqrt(48 / 7)]
    assert_close(m2["x"], torch.tensor(expected))


def test_adagrad_two_steps() -> None:
    opt = ServerAdagrad(lr=1.0, betas=(0.5, 0.99), eps=0.0)
    m1 = opt.step(model(), {"x": torch.tensor([3.0, -4.0])})
    # m = 0.5 [3, -4] = [1.5, -2]; v = [9, 16]; x += m / sqrt(v) = [0.5, -0.5]
    assert_close(m1["x"], torch.tensor([1.5, 1.5]))
    m2 = opt.step(m1, {"x": torch.tensor([0.0, 3.0])})
    # m = 0.5 [1.5, -2] + 0.5 [0, 3] = [0.75, 0.5]; v = [9, 25]; x += [0.75 / 3, 0.5 / 5]
    assert_close(m2["x"], torch.tensor([1.75, 1.6]))


def test_adagrad_without_momentum_is_torch_adagrad_on_minus_delta() -> None:
    ours = ServerAdagrad(lr=0.3, betas=(0.0, 0.0), eps=1e-3)
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ref = torch.optim.Adagrad([p], lr=0.3, eps=1e-3)
    m = {"x": torch.tensor([1.0, 2.0])}
    for delta in ([0.5, -1.0], [2.0, 0.25]):
        m = ours.step(m, {"x": torch.tensor(delta)})
        p.grad = -torch.tensor(delta)
        ref.step()
    assert_close(m["x"], p.detach())


def test_yogi_two_steps() -> None:
    opt = ServerYogi(lr=1.0, betas=(0.5, 0.75), eps=0.0)
    m1 = opt.step(model(), {"x": torch.tensor([2.0, -4.0])})
    # m = [1, -2]; v = 0 - 0.25 [4, 16] sign(0 - [4, 16]) = [1, 4]; x += [1 / 1, -2 / 2]
    assert_close(m1["x"], torch.tensor([2.0, 1.0]))
    m2 = opt.step(m1, {"x": torch.tensor([4.0, 1.0])})
    # m = 0.5 [1, -2] + 0.5 [4, 1] = [2.5, -0.5]; d^2 = [16, 1]; sign(v - d^2) = sign([-15, 3]) = [-1, +1]
    # v = [1 + 0.25 * 16, 4 - 0.25 * 1] = [5, 3.75]
    assert_close(m2["x"], torch.tensor([2.0 + 2.5 / math.sqrt(5), 1.0 - 0.5 / math.sqrt(3.75)]))
