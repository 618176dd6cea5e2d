"""PyTorch Lightning on fedbus's client API, the way NVIDIA FLARE's ``nvflare.client.lightning`` works.

```python
import fedbus.client.lightning as flare

flare.patch(trainer)                      # adds FLCallback (and connects to the site)
while flare.is_running():
    trainer.validate(model, datamodule=dm)    # receives the global model, scores it on local data
    trainer.fit(model, datamodule=dm)         # trains from the global model, sends the result
```

Theory of operation. ``FLCallback`` receives the task's global model the first time ``validate()`` (or,
without a validate call, ``fit()``) starts, and loads it into the module. The metrics of that first
``validate()`` are the global model's metrics: an evaluation task sends them at once (metrics only, no
params leave the site); a training task sends them with its weights when ``fit()`` ends, together with
the number of optimizer steps this fit took (``NUM_STEPS_CURRENT_ROUND``, FedAvg's weight).

A Trainer counts epochs across ``fit()`` calls: once ``max_epochs`` is reached, a second ``fit()`` would
return at once. So after each round ``max_epochs`` (and ``max_steps``, when set) grows by what the first
``fit()`` was configured with, and sanity-check validation is turned off, as FLARE does. With
``restore_state`` (default) the optimizers' and LR schedulers' states carry over from one round's
``fit()`` to the next (Lightning builds new optimizers in every ``fit()``).

If ``fit()`` starts while no training task is current (the job ended, or the next task is an
evaluation), it stops before its first batch and sends nothing; an evaluation task then waits for the
next ``validate()``.

Algorithms the job asks for (``Task.options``), with the script unchanged: FedProx (``fedprox_mu`` > 0) adds the
proximal term's gradient ``mu * (w - w_global)`` to every trainable parameter's gradient before each optimizer
step (``fedbus.client.fedprox.ProximalGradient``), the gradient of ``mu/2 * ||w - w_global||^2`` added to the
loss; SCAFFOLD adds ``c - c_i`` there too and records each step's learning rate, from which ``send()`` computes
the control update (``fedbus.client.scaffold``). Both act in ``on_before_optimizer_step``, which Lightning calls
once per optimizer step, after gradient accumulation and unscaling.

Either Lightning package works: ``lightning.pytorch`` or the standalone ``pytorch_lightning`` (FLARE's examples
import the latter); the callback only uses hooks both call by name.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedbus.client.api import (
    current_options,
    get_config,
    get_job_id,
    get_site_name,
    get_task_name,
    init,
    is_evaluate,
    is_running,
    is_submit_model,
    is_train,
    log,
    receive,
    send,
    shutdown,
    system_info,
)
from fedbus.client.fedprox import ProximalGradient
from fedbus.client.model import NUM_STEPS_CURRENT_ROUND, FLModel, ParamsType
from fedbus.client.scaffold import ScaffoldHelper
from fedbus.errors import ConfigError

try:
    import lightning.pytorch as pl
    from lightning.pytorch.trainer.states import TrainerFn
except ImportError:  # pragma: no cover - depends on which Lightning package is installed
    try:
        # the standalone package: the same API under another name, so its classes are others to a type checker
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.trainer.states import TrainerFn  # type: ignore[assignment]
    except ImportError as exc:
        raise ImportError("fedbus.client.lightning needs PyTorch Lightning: pip install 'fedbus[lightning]'") from exc

__all__ = [
    "FLCallback",
    "FLModel",
    "ParamsType",
    "get_config",
    "get_job_id",
    "get_site_name",
    "get_task_name",
    "init",
    "is_evaluate",
    "is_running",
    "is_submit_model",
    "is_train",
    "log",
    "patch",
    "receive",
    "send",
    "shutdown",
    "system_info",
]


FL_META_KEY = "__fl_meta__"
"""A LightningModule attribute (a dict) whose entries join the meta of every model the patch sends, as in FLARE."""


def patch(
    trainer: pl.Trainer, restore_state: bool = True, load_state_dict_strict: bool = True, update_fit_loop: bool = True
) -> None:
    """Make ``trainer`` federated: connect to the site and add one :class:`FLCallback` (idempotent).

    ``update_fit_loop=False`` leaves ``max_epochs``/``max_steps`` alone between rounds (the script manages them).
    """
    init()
    callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
    if not any(isinstance(cb, FLCallback) for cb in callbacks):
        callback = FLCallback(restore_state, load_state_dict_strict, update_fit_loop)
        callbacks.append(callback)


class FLCallback(pl.Callback):
    """Receives the global model into the module, sends the trained one back; see the module docstring."""

    def __init__(
        self, restore_state: bool = True, load_state_dict_strict: bool = True, update_fit_loop: bool = True
    ) -> None:
        super().__init__()
        self.restore_state = restore_state
        self.strict = load_state_dict_strict
        self.update_fit_loop = update_fit_loop
        self.model: FLModel | None = None  # the current task's global model, once loaded
        self.metrics: dict[str, float] | None = None  # the global model's validation metrics
        self.epochs_per_round: int | None = None
        self.steps_per_round: int | None = None
        self.training = False
        self._start_step = 0
        self._optimizer_states: list[dict[str, Any]] | None = None
        self._scheduler_states: list[dict[str, Any]] | None = None
        self._prox: ProximalGradient | None = None  # FedProx, for the round being trained
        self._scaffold: ScaffoldHelper | None = None  # SCAFFOLD, for the round being trained

    # --- validate(): the global model on local data -----------------------------------------------

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and self.metrics is None:
            self._receive(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.VALIDATING or self.model is None or self.metrics is not None:
            return
        self.metrics = _plain_metrics(trainer.callback_metrics)
        if is_evaluate():
            send(FLModel(metrics=self.metrics))
            self._next_task()

    # --- fit(): train from the global model, send the result ---------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.epochs_per_round is None:  # the first fit's settings are one round's worth
            self.epochs_per_round = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
            self.steps_per_round = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        trainer.should_stop = False
        if self._receive(pl_module) is None or not is_train():
            self.training = False
            trainer.should_stop = True  # nothing to train on: the job ended, or the task is an evaluation
            return
        self.training = True
        self._start_step = trainer.global_step
        if self.restore_state:
            self._restore(trainer)
        self._start_algorithms(pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self.training:
            return
        if self._prox is not None:
            self._prox.apply(pl_module)
        if self._scaffold is not None:
            self._scaffold.correct(pl_module, optimizer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.training:
            self.training = False
            if self.restore_state:
                self._save(trainer)
            steps = trainer.global_step - self._start_step
            params = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
            self._prox = self._scaffold = None
            meta = {NUM_STEPS_CURRENT_ROUND: steps, **_fl_meta(pl_module)}
            send(FLModel(params=params, metrics=self.metrics or {}, meta=meta))
            self._next_task()
        if self.update_fit_loop:
            self._extend(trainer)

    # --- helpers ---------------------------------------------------------------------------------------

    def _receive(self, pl_module: pl.LightningModule) -> FLModel | None:
        if self.model is None:
            model = receive()
            if model is None:
                return None
            if model.params:
                pl_module.load_state_dict(model.params, strict=self.strict)
            self.model = model
        return self.model

    def _start_algorithms(self, pl_module: pl.LightningModule) -> None:
        """FedProx and SCAFFOLD for this round, as the task's options say (the module holds the global model)."""
        options = current_options()
        self._prox = None
        if options is not None and options.fedprox_mu > 0:
            self._prox = ProximalGradient(options.fedprox_mu)
            self._prox.start(pl_module)
        scaffold = ScaffoldHelper()
        self._scaffold = scaffold if scaffold.active else None

    def _next_task(self) -> None:
        self.model, self.metrics = None, None

    def _extend(self, trainer: pl.Trainer) -> None:
        """Let the next ``fit()`` train one more round's worth (the Trainer counts across fits)."""
        trainer.num_sanity_val_steps = 0
        if self.epochs_per_round is not None:
            trainer.fit_loop.max_epochs = trainer.current_epoch + self.epochs_per_round
        if self.steps_per_round is not None:
            trainer.fit_loop.epoch_loop.max_steps = trainer.global_step + self.steps_per_round

    def _save(self, trainer: pl.Trainer) -> None:
        self._optimizer_states = [o.state_dict() for o in trainer.optimizers]
        self._scheduler_states = [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]

    def _restore(self, trainer: pl.Trainer) -> None:
        if self._optimizer_states is not None and len(self._optimizer_states) == len(trainer.optimizers):
            for opt, state in zip(trainer.optimizers, self._optimizer_states, strict=True):
                opt.load_state_dict(state)
        configs = trainer.lr_scheduler_configs
        if self._scheduler_states is not None and len(self._scheduler_states) == len(configs):
            for config, state in zip(configs, self._scheduler_states, strict=True):
                config.scheduler.load_state_dict(state)


def _fl_meta(pl_module: pl.LightningModule) -> dict[str, Any]:
    """The module's ``__fl_meta__`` entries (none when it has no such attribute)."""
    meta = getattr(pl_module, FL_META_KEY, None)
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise ConfigError(f"{type(pl_module).__name__}.{FL_META_KEY} must be a dict, got {type(meta).__name__}")
    return dict(meta)


def _plain_metrics(metrics: Any) -> dict[str, float]:
    """Lightning's callback metrics (tensors) as finite floats, the only kind a result carries."""
    out: dict[str, float] = {}
    for key, value in dict(metrics).items():
        v = float(value.item()) if isinstance(value, torch.Tensor) and value.numel() == 1 else value
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[str(key)] = float(v)
    return out
