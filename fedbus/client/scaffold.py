"""SCAFFOLD on the site: control variates, the gradient correction, and the control update (Option II).

Theory of operation. SCAFFOLD (Karimireddy et al., 2020) corrects each site's drift with control variates: the
server's ``c`` and the site's own ``c_i``, one tensor per weight tensor. Here they travel with the model as extra
tensors named ``scaffold.c.<weight name>`` (``SCAFFOLD_PREFIX``):

1. ``receive()`` takes the global ``c`` out of the task's params before the script sees them, and remembers the
   received weights ``x`` (a copy: the script may train the received tensors in place).
2. Every local step the script (or the Lightning patch) calls :meth:`ScaffoldHelper.correct` after ``backward()``:
   ``grad += c - c_i`` for every trainable parameter, and the step's learning rate is recorded.
3. ``send()`` computes Option II's new control ``c_i+ = c_i - c + (x - y_i) / (K * lr)``, with ``y_i`` the weights
   the script sends, ``K`` the steps corrected this round and ``lr`` their mean learning rate, and adds the
   control deltas ``c_i+ - c_i`` to the result under ``scaffold.c.<name>``; the session keeps ``c_i+`` for the
   next round (zeros before the first).

The arithmetic is in plain functions (:func:`split_controls`, :func:`corrected_gradient`, :func:`control_update`);
:class:`ScaffoldState` is the session's bookkeeping between ``receive()`` and ``send()``.

```python
from fedbus.client.scaffold import ScaffoldHelper

scaffold = ScaffoldHelper()           # acts on the job's current task; does nothing unless the job is SCAFFOLD
...
loss.backward()
scaffold.correct(model, optimizer)    # grad += c - c_i; records the learning rate of this step
optimizer.step()
```
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from fedbus.client.constants import SCAFFOLD_PREFIX
from fedbus.errors import ConfigError, JobError

if TYPE_CHECKING:
    from fedbus.client.session import ClientSession

__all__ = [
    "SCAFFOLD_PREFIX",
    "ScaffoldHelper",
    "ScaffoldState",
    "control_update",
    "corrected_gradient",
    "split_controls",
]


def split_controls(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``params`` split into the weights and the controls, the controls keyed by the weight they belong to."""
    weights: dict[str, Any] = {}
    controls: dict[str, Any] = {}
    for name, value in params.items():
        if name.startswith(SCAFFOLD_PREFIX):
            controls[name[len(SCAFFOLD_PREFIX) :]] = value
        else:
            weights[name] = value
    return weights, controls


def corrected_gradient(grad: torch.Tensor, c_global: torch.Tensor, c_local: torch.Tensor) -> torch.Tensor:
    """``grad + c - c_i``: SCAFFOLD's drift correction of one parameter's gradient (a new tensor)."""
    return grad + (c_global - c_local).to(device=grad.device, dtype=grad.dtype)


def control_update(
    c_local: torch.Tensor, c_global: torch.Tensor, delta: torch.Tensor, steps: int, lr: float
) -> torch.Tensor:
    """Option II's new site control ``c_i - c + (x - y_i) / (K * lr)``, where ``delta = y_i - x``."""
    if steps <= 0 or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"SCAFFOLD's control update needs steps > 0 and a learning rate > 0, got {steps}, {lr}")
    scale = 1.0 / (steps * lr)
    return c_local - c_global - delta.to(c_local.dtype) * scale


class ScaffoldState:
    """A session's SCAFFOLD bookkeeping: ``c_i`` across rounds; ``c``, ``x`` and the recorded steps for a task."""

    def __init__(self) -> None:
        self.c_local: dict[str, torch.Tensor] = {}  # the site's own controls, kept across rounds
        self.c_global: dict[str, torch.Tensor] | None = None  # the current task's, while one is open
        self.x: dict[str, torch.Tensor] | None = None
        self.trained: set[str] = set()  # the parameters corrected this task (their controls move)
        self.lr_sum = 0.0
        self.steps = 0
        self._corrections: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def open(self) -> bool:
        """True between a SCAFFOLD training task's ``receive()`` and its ``send()``."""
        return self.c_global is not None

    def begin(self, weights: Mapping[str, torch.Tensor], controls: Mapping[str, torch.Tensor]) -> None:
        """A training task arrived with the global ``controls``; ``weights`` are the received model ``x``."""
        missing = sorted(set(controls) - set(weights))
        if missing:
            raise JobError(f"SCAFFOLD control {SCAFFOLD_PREFIX}{missing[0]} names no weight of the received model")
        for name, c in controls.items():
            mine = self.c_local.get(name)
            if mine is None or mine.shape != c.shape or mine.dtype != c.dtype:
                self.c_local[name] = torch.zeros_like(c)
        self.c_global = dict(controls)
        self.x = {name: weights[name].detach().clone() for name in controls}
        self.trained, self.lr_sum, self.steps = set(), 0.0, 0
        self._corrections = {}

    def correct(self, named_parameters: Iterable[tuple[str, torch.Tensor]], lr: float) -> None:
        """``grad += c - c_i`` for every trainable parameter that has a control; records one step at ``lr``."""
        if self.c_global is None:
            return
        if not math.isfinite(lr) or lr <= 0:
            raise ConfigError(f"SCAFFOLD needs a learning rate > 0, got {lr!r}")
        for name, p in named_parameters:
            if not p.requires_grad or name not in self.c_global:
                continue
            corr = self._correction(name, p)
            if p.grad is None:
                p.grad = corr.clone()
            else:
                p.grad.add_(corr)
            self.trained.add(name)
        self.lr_sum += float(lr)
        self.steps += 1

    def _correction(self, name: str, p: torch.Tensor) -> torch.Tensor:
        """``c - c_i`` on the parameter's device and in its dtype, computed once per task."""
        key = (name, p.device, p.dtype)
        corr = self._corrections.get(key)
        if corr is None:
            assert self.c_global is not None
            corr = (self.c_global[name] - self.c_local[name]).to(device=p.device, dtype=p.dtype)
            self._corrections[key] = corr
        return corr

    def finish(self, params: Mapping[str, torch.Tensor], *, is_diff: bool) -> dict[str, torch.Tensor]:
        """The control deltas to send under ``scaffold.c.<name>`` for the weights ``params`` (``y_i``, or
        ``y_i - x`` when ``is_diff``); ``c_i`` becomes ``c_i+``. Ends the task's bookkeeping."""
        if self.c_global is None or self.x is None:
            raise JobError("SCAFFOLD: send() without a SCAFFOLD task received")
        if self.steps == 0:
            raise ConfigError(
                "SCAFFOLD: no local step was corrected this round: call fedbus.client.scaffold.ScaffoldHelper()"
                ".correct(model, optimizer) after every backward() (the Lightning patch does it for you)"
            )
        lr = self.lr_sum / self.steps
        deltas: dict[str, torch.Tensor] = {}
        for name, c in self.c_global.items():
            old = self.c_local[name]
            if name not in self.trained:  # never corrected (frozen, or not a parameter): its control stays
                deltas[SCAFFOLD_PREFIX + name] = torch.zeros_like(old)
                continue
            sent = params.get(name)
            if sent is None:
                raise ConfigError(f"SCAFFOLD: the result lacks params[{name!r}], a parameter trained this round")
            delta = sent if is_diff else sent - self.x[name].to(sent.dtype)
            new = control_update(old, c, delta, self.steps, lr)
            deltas[SCAFFOLD_PREFIX + name] = new - old
            self.c_local[name] = new
        self.end()
        return deltas

    def end(self) -> None:
        """Drop the task's bookkeeping (``c_i`` stays)."""
        self.c_global, self.x, self._corrections = None, None, {}
        self.trained, self.lr_sum, self.steps = set(), 0.0, 0


class ScaffoldHelper:
    """The script's handle on SCAFFOLD: applies ``grad += c - c_i`` and records each step's learning rate.

    It acts on the session's current task, and does nothing when that task is not a SCAFFOLD training task, so a
    script may call it unconditionally.
    """

    def __init__(self, session: ClientSession | None = None) -> None:
        self._session = session

    def _state(self) -> ScaffoldState:
        if self._session is not None:
            return self._session.scaffold
        from fedbus.client.api import current_session  # the package imports this module: resolve it late

        return current_session().scaffold

    @property
    def active(self) -> bool:
        """True while the current task is a SCAFFOLD training task (between ``receive()`` and ``send()``)."""
        return self._state().open

    def correct(self, model: torch.nn.Module | Iterable[tuple[str, torch.Tensor]], lr: float | Any) -> None:
        """Call once per optimizer step, after ``backward()`` and before ``step()``.

        ``model``: the module (its ``named_parameters()``, named as in its ``state_dict()``) or (name, parameter)
        pairs. ``lr``: the step's learning rate, or the optimizer (all its parameter groups must share one).
        """
        named = model.named_parameters() if isinstance(model, torch.nn.Module) else model
        self._state().correct(named, optimizer_lr(lr))


def optimizer_lr(lr: float | Any) -> float:
    """``lr`` itself, or the learning rate an optimizer's parameter groups share."""
    groups = getattr(lr, "param_groups", None)
    if groups is None:
        if isinstance(lr, bool) or not isinstance(lr, int | float):
            raise ConfigError(f"SCAFFOLD: lr must be a number or an optimizer, got {type(lr).__name__}")
        return float(lr)
    rates = {float(g["lr"]) for g in groups}
    if len(rates) != 1:
        raise ConfigError(f"SCAFFOLD needs one learning rate for all parameter groups, got {sorted(rates)}")
    return rates.pop()
