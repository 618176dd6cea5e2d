"""FedOpt (Reddi et al., ICLR 2021, "Adaptive Federated Optimization"): FedAvg's round, a server optimizer's step.

Each round is :class:`FedAvg`'s barrier (``min_clients``, ``num_rounds``, ``round_timeout``, evaluation, time
budget). The accepted results are averaged, weighted by sample count as FedAvg does, into the mean update
``delta = mean(local) - global`` (mean of the DIFF results, or of the FULL ones minus the global: either kind is
taken; ``params_type`` asks for DIFF, which keeps small updates exact). ``-delta`` is the pseudo-gradient, and a
server optimizer moves the global model along it (``fedbus.strategy.server_opt``)::

    sgd      v = momentum * v + delta;                         x += lr * v
    adam     m, v Adam's moments of delta, bias-corrected;    x += lr * m_hat / (sqrt(v_hat) + tau)
    adagrad  m = b1 m + (1 - b1) delta; v += delta^2;          x += lr * m / (sqrt(v) + tau)
    yogi     m as adagrad; v -= (1 - b2) delta^2 sign(v - delta^2); x += lr * m / (sqrt(v) + tau)

``sgd`` with ``server_lr = 1`` and no momentum is FedAvg. ``lr_schedule = "cosine"`` anneals the rate from
``server_lr`` at the first round toward ``server_lr_min`` over ``num_rounds`` steps, as torch's CosineAnnealingLR
with ``T_max = num_rounds``: ``lr_t = lr_min + (lr - lr_min) (1 + cos(pi t / num_rounds)) / 2`` at step t = 0, 1,
... (t = the version the round trained from). Integer tensors are not optimized: FULL results give them the
elementwise max, DIFF results leave them alone (as FedAvg). The optimizer's state (momentum, moments) lives in
the strategy: a job resumed from a checkpoint starts it again from zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch

from fedbus.errors import ConfigError
from fedbus.strategy._config import check_choice, check_float
from fedbus.strategy.aggregate import finalize_mean
from fedbus.strategy.base import ParamsType
from fedbus.strategy.fedavg import FedAvg
from fedbus.strategy.server_opt import ServerAdagrad, ServerAdam, ServerOptimizer, ServerSGD, ServerYogi

_OWNER = "FedOpt"
OPTIMIZERS = ("sgd", "adam", "adagrad", "yogi")


class FedOpt(FedAvg):
    """FedAvg's barrier with a server optimizer on the averaged update; see the module docstring."""

    name: ClassVar[str] = "fedopt"
    params_type: ClassVar[ParamsType] = "DIFF"

    def __init__(
        self,
        min_clients: int,
        num_rounds: int,
        server_optimizer: Literal["sgd", "adam", "adagrad", "yogi"] = "sgd",
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        betas: Sequence[float] = (0.9, 0.99),
        tau: float = 1e-3,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        server_lr_min: float = 0.0,
        max_clients: int | None = None,
        round_timeout: float | None = None,
        evaluate_every: int = 0,
        time_budget: float | None = None,
    ) -> None:
        super().__init__(min_clients, num_rounds, max_clients, round_timeout, evaluate_every, time_budget)
        kind = check_choice(_OWNER, "server_optimizer", server_optimizer, OPTIMIZERS)
        self.server_lr = check_float(_OWNER, "server_lr", server_lr, gt=0)
        momentum = check_float(_OWNER, "server_momentum", server_momentum, ge=0, lt=1)
        if momentum and kind != "sgd":
            raise ConfigError(f"{_OWNER}: server_momentum applies to sgd; {kind} takes betas")
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ConfigError(f"{_OWNER}: betas must be two numbers, got {betas!r}")
        b1 = check_float(_OWNER, "betas[0]", betas[0], ge=0, lt=1)
        b2 = check_float(_OWNER, "betas[1]", betas[1], ge=0, lt=1)
        eps = check_float(_OWNER, "tau", tau, gt=0)
        self.lr_schedule = check_choice(_OWNER, "lr_schedule", lr_schedule, ["constant", "cosine"])
        self.server_lr_min = check_float(_OWNER, "server_lr_min", server_lr_min, ge=0)
        if self.lr_schedule == "cosine" and self.server_lr_min > self.server_lr:
            raise ConfigError(f"{_OWNER}: server_lr_min must be <= server_lr, got {server_lr_min!r}")
        self.server_optimizer = kind
        self.optimizer: ServerOptimizer
        if kind == "sgd":
            self.optimizer = ServerSGD(self.server_lr, momentum)
        elif kind == "adam":
            self.optimizer = ServerAdam(self.server_lr, (b1, b2), eps)
        elif kind == "adagrad":
            self.optimizer = ServerAdagrad(self.server_lr, (b1, b2), eps)
        else:
            self.optimizer = ServerYogi(self.server_lr, (b1, b2), eps)

    def lr_at(self, step: int) -> float:
        """The server learning rate of step ``step`` (0 for the first round)."""
        if self.lr_schedule == "constant":
            return self.server_lr
        t = min(step, self.num_rounds)
        cos = (1 + math.cos(math.pi * t / self.num_rounds)) / 2
        return self.server_lr_min + (self.server_lr - self.server_lr_min) * cos

    @torch.no_grad()
    def _finish_aggregate(self) -> dict[str, torch.Tensor]:
        mean = finalize_mean(self._acc, self._weight)
        delta: dict[str, torch.Tensor] = {}
        counters: dict[str, torch.Tensor] = {}
        for name, g in self._global.items():
            m = mean.get(name)
            if m is None:
                continue  # an integer tensor DIFF results left alone
            if not (g.is_floating_point() or g.is_complex()):
                counters[name] = m  # FULL results: the elementwise max, as FedAvg
            else:
                delta[name] = m if self._acc_type == "DIFF" else m.sub_(g)
        self.optimizer.lr = self.lr_at(self._version)
        out = self.optimizer.step(self._global, delta)
        out.update(counters)
        self._acc = {}
        return out
