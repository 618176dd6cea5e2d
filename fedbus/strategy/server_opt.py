"""Server-side optimizers: how an aggregated delta moves the global model.

Treating the averaged client delta as a pseudo-gradient (Reddi et al., ICLR 2021, "Adaptive Federated
Optimization") lets the server apply momentum or Adam to it. Conventions here: a delta is
``local - global`` (fedbus's DIFF), so the server *adds* it; ``step`` returns a NEW model dict and never
writes into the tensors of the one it was given, because those were published and may still be streaming.
Tensors without an entry in the delta (integer counters) are carried over unchanged.

Optimizers: :class:`ServerSGD` (heavy-ball momentum), :class:`ServerAdam` (bias-corrected, as torch's Adam),
:class:`ServerAdagrad` and :class:`ServerYogi` (Reddi et al.'s FedAdagrad and FedYogi, no bias correction). Each
has a mutable ``lr``, which a schedule may change between steps.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

import torch


class ServerOptimizer(abc.ABC):
    """Applies one aggregated delta to the global model; keeps its own state (momentum, moments)."""

    lr: float
    """The step size of the next ``step`` (a schedule may change it between steps)."""

    @abc.abstractmethod
    def step(self, model: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The next global model; ``model`` and ``delta`` are only read."""


class ServerSGD(ServerOptimizer):
    """``v = m * v + delta; global += lr * v`` (heavy-ball momentum; plain ``global += lr * delta`` at m=0)."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.0) -> None:
        self.lr = lr
        self.momentum = momentum
        self._velocity: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, model: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(model)
        for name, d in delta.items():
            if self.momentum:
                v = self._velocity.get(name)
                if v is None:
                    v = self._velocity[name] = d.clone()  # v = m * 0 + delta
                else:
                    v.mul_(self.momentum).add_(d)
                d = v
            out[name] = torch.add(model[name], d, alpha=self.lr)
        return out


class ServerAdam(ServerOptimizer):
    """Adam on the pseudo-gradient, with bias correction: ``global += lr * m_hat / (sqrt(v_hat) + eps)``.

    Each coordinate moves by about ``lr`` per step whatever the delta's scale, which is why FedAdam
    helps when client deltas are tiny or badly scaled.
    """

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8) -> None:
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self._t = 0
        self._m: dict[str, torch.Tensor] = {}
        self._v: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, model: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._t += 1
        bc1 = 1.0 - self.beta1**self._t
        bc2 = 1.0 - self.beta2**self._t
        out = dict(model)
        for name, d in delta.items():
            m = self._m.setdefault(name, torch.zeros_like(d))
            v = self._v.setdefault(name, torch.zeros_like(d))
            m.mul_(self.beta1).add_(d, alpha=1.0 - self.beta1)
            v.mul_(self.beta2).addcmul_(d, d, value=1.0 - self.beta2)
            denom = v.div(bc2).sqrt_().add_(self.eps)
            out[name] = torch.addcdiv(model[name], m, denom, value=self.lr / bc1)
        return out


class _AdaptiveNoBias(ServerOptimizer):
    """The FedAdagrad / FedYogi family of Reddi et al. (Algorithm 2), without bias correction:
    ``m = b1 * m + (1 - b1) * delta``, ``v = update(v, delta^2)``, ``global += lr * m / (sqrt(v) + eps)``,
    with m and v starting at zero."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-3) -> None:
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self._m: dict[str, torch.Tensor] = {}
        self._v: dict[str, torch.Tensor] = {}

    @abc.abstractmethod
    def _second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> None:
        """Update ``v`` in place from the squared delta ``sq``."""

    @torch.no_grad()
    def step(self, model: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(model)
        for name, d in delta.items():
            m = self._m.setdefault(name, torch.zeros_like(d))
            v = self._v.setdefault(name, torch.zeros_like(d))
            m.mul_(self.beta1).add_(d, alpha=1.0 - self.beta1)
            self._second_moment(v, d * d)
            out[name] = torch.addcdiv(model[name], m, v.sqrt().add_(self.eps), value=self.lr)
        return out


class ServerAdagrad(_AdaptiveNoBias):
    """FedAdagrad: ``v += delta^2``. With ``betas[0] = 0`` this is torch's Adagrad on the pseudo-gradient
    ``-delta`` (no lr decay, zero initial accumulator); ``betas[1]`` is unused."""

    def _second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> None:
        v.add_(sq)


class ServerYogi(_AdaptiveNoBias):
    """FedYogi: ``v -= (1 - b2) * delta^2 * sign(v - delta^2)``: v grows toward delta^2 like Adam's, but
    additively, so a sudden large delta does not inflate it (Zaheer et al., 2018)."""

    def _second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> None:
        v.addcmul_(sq, torch.sign(v - sq), value=-(1.0 - self.beta2))
