"""FedProx (Li et al., MLSys 2020): FedAvg on the server, a proximal term on the sites.

FedProx changes local training only: each site minimizes ``loss + mu/2 * ||w - w_global||^2``, which keeps
heterogeneous sites from drifting far from the global model. The server side is exactly :class:`FedAvg`
(same barrier, same weighted mean); the only addition is ``fedprox_mu``, which every task carries to the
client API in ``Task.options`` (``client_options()``) so the script, or fedbus's Lightning patch, adds the
term. ``fedprox_mu = 0`` is plain FedAvg.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fedbus.strategy._config import check_float
from fedbus.strategy.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg whose tasks ask the sites for a proximal term of weight ``fedprox_mu``."""

    name: ClassVar[str] = "fedprox"

    def __init__(
        self,
        min_clients: int,
        num_rounds: int,
        fedprox_mu: float = 0.01,
        max_clients: int | None = None,
        round_timeout: float | None = None,
        evaluate_every: int = 0,
        time_budget: float | None = None,
    ) -> None:
        super().__init__(min_clients, num_rounds, max_clients, round_timeout, evaluate_every, time_budget)
        self.fedprox_mu = check_float("FedProx", "fedprox_mu", fedprox_mu, ge=0)

    def client_options(self) -> dict[str, Any]:
        return {"fedprox_mu": self.fedprox_mu}
