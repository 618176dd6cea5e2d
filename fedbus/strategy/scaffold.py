"""SCAFFOLD (Karimireddy et al., ICML 2020, Algorithm 1, option II): FedAvg with control variates.

The global model this strategy publishes holds the weights ``x`` plus one server control variate ``c`` per
floating weight tensor, stored as ``scaffold.c.<name>`` (:data:`SCAFFOLD_PREFIX`; the client API keeps the same
literal in ``fedbus.client.constants``). Integer tensors (counters) get no control. The client API strips the
controls before the script sees the model, keeps the site's own ``c_i`` across rounds, corrects local steps by
``c - c_i`` and returns, as DIFF (``params_type = "DIFF"``), the weight deltas ``dy = y_i - x`` under the weight
names and the control deltas ``dc = c_i+ - c_i`` under the control names: the same names as the published model,
so every result is checked against it like a FedAvg one.

Server step, once per round over the accepted set S (the barrier is :class:`FedAvg`'s: ``min_clients``,
``num_rounds``, ``round_timeout``, evaluation and time budget behave the same)::

    x += server_lr * sum_i(w_i * dy_i) / sum_i(w_i)      (w_i: the sites' sample counts, as FedAvg weights them)
    c += (|S| / N) * mean_i(dc_i)  =  sum_i(dc_i) / N

where N is the number of the job's sites: those ``start`` was given plus any that joined since. A FULL result
is refused: SCAFFOLD's control update exists only as a delta.

``start`` takes the weights alone (a recipe's model: every control starts at zero) or weights plus controls (a
checkpoint of this strategy); a control without a matching floating weight of the same shape and dtype is an
error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from fedbus.errors import StrategyError
from fedbus.strategy._config import check_float
from fedbus.strategy.aggregate import weighted_sum_into
from fedbus.strategy.base import Action, Params, ParamsType, Update
from fedbus.strategy.fedavg import FedAvg

SCAFFOLD_PREFIX = "scaffold.c."
"""Names of control variates in the published model: ``scaffold.c.<weight name>``."""


def with_controls(model: Params) -> dict[str, torch.Tensor]:
    """``model``'s weights and controls, adding a zero control for every floating weight that has none.

    Raises StrategyError for a control whose weight is missing, not floating, or of another shape or dtype.
    The tensors given are not copied (the caller copies); the added zeros are new.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in model.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise StrategyError(f"model entry {name!r} must map a str to a tensor")
        if name.startswith(SCAFFOLD_PREFIX):
            w = model.get(name[len(SCAFFOLD_PREFIX) :])
            if not isinstance(w, torch.Tensor) or not w.is_floating_point():
                raise StrategyError(f"control {name!r} has no floating weight {name[len(SCAFFOLD_PREFIX) :]!r}")
            if w.shape != t.shape or w.dtype != t.dtype:
                raise StrategyError(f"control {name!r} must match its weight's shape and dtype")
        out[name] = t
    for name, t in list(out.items()):
        if not name.startswith(SCAFFOLD_PREFIX) and t.is_floating_point():
            out.setdefault(SCAFFOLD_PREFIX + name, torch.zeros_like(t))
    return out


class Scaffold(FedAvg):
    """SCAFFOLD on FedAvg's round barrier; see the module docstring."""

    name: ClassVar[str] = "scaffold"
    params_type: ClassVar[ParamsType] = "DIFF"

    def __init__(
        self,
        min_clients: int,
        num_rounds: int,
        server_lr: float = 1.0,
        max_clients: int | None = None,
        round_timeout: float | None = None,
        evaluate_every: int = 0,
        time_budget: float | None = None,
    ) -> None:
        super().__init__(min_clients, num_rounds, max_clients, round_timeout, evaluate_every, time_budget)
        self.server_lr = check_float("Scaffold", "server_lr", server_lr, gt=0)
        self._known: set[str] = set()

    def client_options(self) -> dict[str, Any]:
        return {"scaffold": True}

    @property
    def num_sites(self) -> int:
        """N in ``c += |S|/N * mean(dc)``: the sites given to ``start`` plus those that joined since."""
        return len(self._known)

    def start(self, model: Params, sites: Sequence[str], now: float, *, version: int = 0) -> list[Action]:
        full = with_controls(model) if isinstance(model, Mapping) else model  # else FedAvg.start says why
        if not isinstance(sites, str):
            self._known = set(sites)
        return super().start(full, sites, now, version=version)

    def site_joined(self, site: str, now: float) -> list[Action]:
        if not self.done:
            self._known.add(site)
        return super().site_joined(site, now)

    def _reset_round(self) -> None:
        super()._reset_round()
        self._acc_c: dict[str, torch.Tensor] = {}

    def _check_result(self, update: Update) -> str | None:
        if update.params_type != "DIFF":
            return "SCAFFOLD needs DIFF results (weight deltas plus control deltas), got FULL"
        return super()._check_result(update)

    def _accumulate(self, update: Update, w: float) -> None:
        params = update.params
        assert params is not None
        weights = {k: params[k] for k in params if not k.startswith(SCAFFOLD_PREFIX)}
        controls = {k: params[k] for k in params if k.startswith(SCAFFOLD_PREFIX)}
        weighted_sum_into(self._acc, weights, w, integers="skip")
        weighted_sum_into(self._acc_c, controls, 1.0, integers="skip")

    @torch.no_grad()
    def _finish_aggregate(self) -> dict[str, torch.Tensor]:
        n_sites = max(self.num_sites, self._round["accepted"])
        out: dict[str, torch.Tensor] = {}
        for name, g in self._global.items():
            if name.startswith(SCAFFOLD_PREFIX):
                out[name] = torch.add(g, self._acc_c[name], alpha=1.0 / n_sites)
            elif name in self._acc:
                out[name] = torch.add(g, self._acc[name], alpha=self.server_lr / self._weight)
            else:
                out[name] = g  # an integer counter: deltas leave it alone
        self._acc, self._acc_c = {}, {}
        return out
