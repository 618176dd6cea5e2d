"""FedProx's proximal term on the client: its value and gradient by hand, the loss and the gradient forms agree."""

from __future__ import annotations

import pytest
import torch

from fedbus.client.fedprox import FedProxLoss, ProximalGradient, proximal_term
from fedbus.errors import ConfigError

pytestmark = pytest.mark.timeout(30)


def _net() -> torch.nn.Linear:
    net = torch.nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0]]))
        net.bias.copy_(torch.tensor([0.5]))
    return net


def test_value_and_gradient_by_hand() -> None:
    net = _net()
    global_params = {"weight": torch.tensor([[0.0, 4.0]]), "bias": torch.tensor([0.0])}
    term = FedProxLoss(mu=0.5)(net, global_params)
    # 0.5/2 * ((1-0)^2 + (2-4)^2 + (0.5-0)^2) = 0.25 * 5.25
    assert term.item() == pytest.approx(1.3125)
    term.backward()
    torch.testing.assert_close(net.weight.grad, torch.tensor([[0.5, -1.0]]))  # mu * (w - w_global)
    torch.testing.assert_close(net.bias.grad, torch.tensor([0.25]))


def test_a_global_module_numpy_params_and_frozen_parameters() -> None:
    net, other = _net(), _net()
    assert FedProxLoss(mu=1.0)(net, other).item() == 0.0
    net.bias.requires_grad_(False)
    with torch.no_grad():
        net.bias.fill_(100.0)  # frozen: not pulled, not counted
    params = {"weight": torch.tensor([[1.0, 1.0]]).numpy()}
    assert proximal_term(net.named_parameters(), params, mu=2.0).item() == pytest.approx(1.0)


def test_the_gradient_form_is_the_loss_forms_gradient() -> None:
    g = torch.Generator().manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
    global_params = {k: v.detach().clone() for k, v in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)  # away from the global model

    def task_loss() -> torch.Tensor:
        return torch.nn.functional.mse_loss(net(x), y)

    net.zero_grad()
    (task_loss() + FedProxLoss(mu=0.3)(net, global_params)).backward()
    as_loss = {k: p.grad.clone() for k, p in net.named_parameters()}

    net.zero_grad()
    task_loss().backward()
    task_only = {k: p.grad.clone() for k, p in net.named_parameters()}
    prox = ProximalGradient(0.3)
    prox.global_params = global_params
    prox.apply(net)
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.grad, as_loss[k])
        assert not torch.allclose(task_only[k], as_loss[k]), k  # the term matters


def test_mu_from_the_task_and_errors() -> None:
    net = _net()
    assert FedProxLoss()(net, {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}).item() == 0.0  # no task: 0
    with pytest.raises(ConfigError, match="mu must be a number >= 0"):
        FedProxLoss(mu=-1.0)
    with pytest.raises(ConfigError, match="no 'bias'"):
        FedProxLoss(mu=1.0)(net, {"weight": torch.zeros(1, 2)})
    with pytest.raises(ConfigError, match="shape"):
        FedProxLoss(mu=1.0)(net, {"weight": torch.zeros(2, 2), "bias": torch.zeros(1)})
    with pytest.raises(ConfigError, match="> 0"):
        ProximalGradient(0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_the_proximal_gradient_on_the_gpu() -> None:
    net = _net().cuda()
    prox = ProximalGradient(2.0)
    prox.start(net)
    with torch.no_grad():
        net.weight.add_(1.0)
    net.zero_grad()
    prox.apply(net)  # no gradient yet: it becomes the pull
    assert net.weight.grad.device.type == "cuda"
    torch.testing.assert_close(net.weight.grad.cpu(), torch.full((1, 2), 2.0))
    assert torch.equal(net.bias.grad.cpu(), torch.zeros(1))
