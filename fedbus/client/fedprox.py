"""FedProx on the site: the proximal term ``mu/2 * ||w - w_global||^2`` that keeps local training near the global model.

Two forms, one term (Li et al., 2020):

* :class:`FedProxLoss` for a plain PyTorch loop (FLARE's ``PTFedProxLoss``): added to the task loss, autograd does
  the rest. ``mu`` defaults to the job's ``fedprox_mu`` (the task's options), so a script written once serves any
  FedProx job::

      fedprox = FedProxLoss()
      loss = criterion(model(x), y) + fedprox(model, input_model.params)

* :class:`ProximalGradient` for the Lightning patch, which cannot touch the script's loss: after ``backward()`` it
  adds the term's gradient ``mu * (w - w_global)`` to every trainable parameter's gradient, the same step the
  loss form gives.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from fedbus.errors import ConfigError

__all__ = ["FedProxLoss", "ProximalGradient", "proximal_term"]


def proximal_term(
    named_parameters: Iterable[tuple[str, torch.Tensor]], global_params: Mapping[str, Any], mu: float
) -> torch.Tensor:
    """``mu/2 * sum ||w - w_global||^2`` over the trainable parameters (a differentiable scalar).

    Every trainable parameter must have its global counterpart (by name, as in ``state_dict()``); the global values
    may be tensors or numpy arrays and carry no gradient.
    """
    total: torch.Tensor | None = None
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        g = global_params.get(name)
        if g is None:
            raise ConfigError(f"FedProx: the global model has no {name!r}, a trainable parameter of the local model")
        g = torch.as_tensor(g).detach().to(device=p.device, dtype=p.dtype)
        if g.shape != p.shape:
            raise ConfigError(f"FedProx: {name!r} has shape {tuple(p.shape)} locally, {tuple(g.shape)} globally")
        term = (p - g).square().sum()
        total = term if total is None else total + term
    if total is None:
        raise ConfigError("FedProx: the local model has no trainable parameters")
    return total * (mu / 2.0)


def _named(model: torch.nn.Module | Mapping[str, Any]) -> dict[str, Any]:
    return dict(model.named_parameters()) if isinstance(model, torch.nn.Module) else dict(model)


class FedProxLoss(torch.nn.Module):
    """``fedprox(local_model, global_model)``: the proximal term, 0 when ``mu`` is 0.

    ``local_model``: the module being trained. ``global_model``: the received model, as a module or as its
    params (``input_model.params``). ``mu``: fixed, or None to read the job's ``fedprox_mu`` at every call.
    """

    def __init__(self, mu: float | None = None) -> None:
        super().__init__()
        if mu is not None and (isinstance(mu, bool) or not isinstance(mu, int | float) or not mu >= 0):
            raise ConfigError(f"FedProxLoss: mu must be a number >= 0, got {mu!r}")
        self.mu = mu

    def current_mu(self) -> float:
        """The ``mu`` in force: the fixed one, else the current task's ``fedprox_mu`` (0 without a task)."""
        if self.mu is not None:
            return float(self.mu)
        from fedbus.client.api import current_options  # the package imports this module: resolve it late

        options = current_options()
        return options.fedprox_mu if options is not None else 0.0

    def forward(self, local_model: torch.nn.Module, global_model: torch.nn.Module | Mapping[str, Any]) -> torch.Tensor:
        mu = self.current_mu()
        params = local_model.named_parameters()
        if mu == 0.0:
            device = next(local_model.parameters(), torch.zeros(())).device
            return torch.zeros((), device=device)
        return proximal_term(params, _named(global_model), mu)


class ProximalGradient:
    """FedProx applied to gradients: ``grad += mu * (w - w_global)`` for a module's trainable parameters.

    ``start`` snapshots the global weights (the module just loaded the received model); ``apply`` runs once per
    optimizer step, after ``backward()``.
    """

    def __init__(self, mu: float) -> None:
        if not mu > 0:
            raise ConfigError(f"FedProx: mu must be > 0 to apply a proximal gradient, got {mu!r}")
        self.mu = float(mu)
        self.global_params: dict[str, torch.Tensor] = {}

    def start(self, module: torch.nn.Module) -> None:
        self.global_params = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    def apply(self, module: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, p in module.named_parameters():
                g = self.global_params.get(name)
                if g is None or not p.requires_grad:
                    continue
                pull = (p.detach() - g.to(p.device)) * self.mu
                if p.grad is None:
                    p.grad = pull
                else:
                    p.grad.add_(pull)
