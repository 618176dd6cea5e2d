"""FedAvgLr: federated logistic regression by a server-side Newton-Raphson step (FLARE's hello-lr).

The global model is one tensor, ``{"numpy_key": theta}`` of shape ``(num_features + 1, 1)``: row 0 is the
intercept, rows 1.. the feature weights (the sites prepend a column of ones to their data). The sites do not
train: each one evaluates, at the global ``theta``, the gradient of its data's log-likelihood and the Hessian
of its negative log-likelihood, and sends them (FULL) with its sample count as weight::

    {"gradient": X^T (y - p)     shape (num_features + 1, 1),
     "hessian":  X^T D X         shape (num_features + 1, num_features + 1)},   p = sigmoid(X theta), D = p (1 - p)

The server averages both, weighted by sample count (as FedAvg), and takes one damped Newton step, with
``epsilon * I`` added so an empty or degenerate Hessian can still be solved::

    theta += damping_factor * (mean(H) + epsilon * I)^-1 mean(g)

(the loss's gradient is ``-g`` and its Hessian ``H``, so this is ``theta -= damping * H^-1 grad(loss)``). The
solve runs in float64; the result keeps the model's dtype. A round whose system cannot be solved fails the job.
Rounds are :class:`FedAvg`'s barrier (``min_clients``, ``num_rounds``, ``round_timeout``).

Writing your own aggregator
---------------------------
This class is the worked example of the aggregator extension point: a :class:`~fedbus.strategy.Strategy`
subclass, named in the job as ``[strategy] name = "package.module:ClassName"`` (the job folder is importable),
whose sites send something other than the global model's tensors. Three methods make that work:

* ``input_spec()`` declares the names, dtypes and shapes every training result must carry. The broker checks
  each upload's header against it before it takes a payload byte, and refuses a mismatch naming the tensor.
* ``validate_input(reference, params)`` is then called with the declared tensors (as meta tensors, see
  ``Strategy.input_reference``) and the received params; it returns why they cannot be taken, or None. Call
  ``validate_update`` first (names, dtypes, shapes, finite values), then add your own rules; here the Hessian
  must be symmetric.
* How results fold into the model: subclassing :class:`FedAvg` gives the round barrier, and overriding
  ``_accumulate`` and ``_finish_aggregate`` gives the arithmetic, as below.

Results are checked against the declared inputs, never the global model, so the sites may send any tensors
the aggregator understands (statistics, sketches, gradients).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from fedbus.errors import StrategyError
from fedbus.strategy._config import check_choice, check_float, check_int
from fedbus.strategy.aggregate import finalize_mean, weighted_sum_into
from fedbus.strategy.base import Action, Params, ParamsType, Update, validate_update
from fedbus.strategy.fedavg import FedAvg

NUMPY_KEY = "numpy_key"
"""The model's only tensor (FLARE's ``NPConstants.NUMPY_KEY``)."""
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class FedAvgLr(FedAvg):
    """Logistic regression by damped Newton steps on the sites' summed statistics; see the module docstring."""

    name: ClassVar[str] = "fedavg_lr"
    params_type: ClassVar[ParamsType] = "FULL"

    def __init__(
        self,
        min_clients: int,
        num_rounds: int,
        num_features: int,
        damping_factor: float = 1.0,
        epsilon: float = 1.0,
        input_dtype: str = "float64",
        max_clients: int | None = None,
        round_timeout: float | None = None,
    ) -> None:
        super().__init__(min_clients, num_rounds, max_clients, round_timeout)
        self.num_features = check_int("FedAvgLr", "num_features", num_features, minimum=1)
        self.damping_factor = check_float("FedAvgLr", "damping_factor", damping_factor, gt=0)
        self.epsilon = check_float("FedAvgLr", "epsilon", epsilon, ge=0)
        self.input_dtype = _DTYPES[check_choice("FedAvgLr", "input_dtype", input_dtype, list(_DTYPES))]

    def input_spec(self) -> Mapping[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The sites' gradient ``(d, 1)`` and Hessian ``(d, d)``, d = num_features + 1, in ``input_dtype``."""
        d = self.num_features + 1
        return {"gradient": (self.input_dtype, (d, 1)), "hessian": (self.input_dtype, (d, d))}

    def validate_input(self, reference: Params, params: Params) -> str | None:
        """The declared names, dtypes and shapes, finite values, and a symmetric Hessian."""
        reason = validate_update(reference, params)
        if reason is not None:
            return reason
        h = params["hessian"]
        scale = float(h.abs().max()) if h.numel() else 0.0
        if not torch.allclose(h, h.T, rtol=1e-5, atol=1e-6 * scale):
            return "'hessian' must be symmetric"
        return None

    def start(self, model: Params, sites: Sequence[str], now: float, *, version: int = 0) -> list[Action]:
        d = self.num_features + 1
        theta = model.get(NUMPY_KEY) if isinstance(model, Mapping) else None
        if len(model) != 1 or not isinstance(theta, torch.Tensor) or not theta.is_floating_point():
            raise StrategyError(f"FedAvgLr: the model must be {{{NUMPY_KEY!r}: a float tensor of shape ({d}, 1)}}")
        if tuple(theta.shape) != (d, 1):
            raise StrategyError(
                f"FedAvgLr: {NUMPY_KEY!r} must have shape ({d}, 1) for num_features={self.num_features}, "
                f"got {tuple(theta.shape)}"
            )
        return super().start(model, sites, now, version=version)

    def _check_result(self, update: Update) -> str | None:
        if update.params_type != "FULL":
            return "FedAvgLr needs FULL results (the gradient and Hessian at the global weights), got DIFF"
        return super()._check_result(update)

    def _accumulate(self, update: Update, w: float) -> None:
        assert update.params is not None
        weighted_sum_into(self._acc, update.params, w)

    @torch.no_grad()
    def _finish_aggregate(self) -> dict[str, torch.Tensor]:
        mean = finalize_mean(self._acc, self._weight)
        self._acc = {}
        g, h = mean["gradient"].double(), mean["hessian"].double()
        system = h + self.epsilon * torch.eye(h.shape[0], dtype=torch.float64)
        step, info = torch.linalg.solve_ex(system, g)
        if int(info) != 0 or not bool(torch.isfinite(step).all()):
            raise StrategyError("the averaged Hessian plus epsilon * I is singular: no Newton step")
        theta = self._global[NUMPY_KEY]
        return {NUMPY_KEY: (theta.double() + self.damping_factor * step).to(theta.dtype)}
