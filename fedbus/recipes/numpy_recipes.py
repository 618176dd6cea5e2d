"""FLARE's numpy recipes: params are numpy arrays in the script, end to end.

The model travels as float32 tensors (safetensors, like every fedbus model) and the job's ``[client]
exchange = "numpy"`` makes the client API hand the script numpy arrays and take numpy arrays back, so a
FLARE numpy script (``params[NPConstants.NUMPY_KEY]``) runs unchanged.

* :class:`NumpyFedAvgRecipe`: FedAvg of one array (``model`` as a list or ndarray, or ``initial_ckpt``,
  a ``.npy`` file).
* :class:`NumpyCrossSiteEvalRecipe`: evaluation of server models (``model_dir`` / ``model_name`` or
  ``initial_ckpt``) on every site (the ``cross_site_eval`` strategy, standalone); without ``eval_script``
  a built-in evaluator (FLARE's demo ``NPValidator`` metric) runs at the sites.
* :class:`FedAvgLrRecipe`: logistic regression by a server-side Newton step; sites send their gradient
  and Hessian, the strategy (``fedavg_lr``) declares those inputs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedbus.client.constants import DataKind, TransferType
from fedbus.config import is_safe_name
from fedbus.errors import ConfigError
from fedbus.modelio import serde
from fedbus.recipes import _models
from fedbus.recipes.recipe import FedAvgRecipe, PathLike, Recipe

NUMPY = "numpy"
VALIDATOR_SCRIPT = Path(__file__).resolve().parent / "_np_validator.py"
SERVER_MODELS = "cross_site_models"
"""The job folder's directory of server models for cross-site evaluation (``NAME.safetensors`` is evaluated by
every site as model ``NAME``): the broker gives them to the ``cross_site_eval`` strategy."""
GLOBAL_NAME = "server"
"""The name under which cross-site evaluation reports the job's own model."""


class NumpyFedAvgRecipe(FedAvgRecipe):
    """FedAvg over numpy arrays: ``model`` is an array (a nested list or an ndarray; a dict of them for
    several), sent to the script as ``{"numpy_key": ndarray}``."""

    def __init__(
        self,
        name: str = "fedavg",
        model: Any = None,
        train_script: PathLike | None = None,
        train_args: str | Sequence[Any] = (),
        min_clients: int = 1,
        num_rounds: int = 2,
        *,
        initial_ckpt: PathLike | None = None,
        aggregator_data_kind: DataKind | str | None = DataKind.WEIGHTS,
        launch_external_process: bool = False,
        params_transfer_type: TransferType | str = TransferType.FULL,
        key_metric: str | None = "accuracy",
        client_memory_gc_rounds: int = 0,
        evaluate_every: int = 0,
        files: Sequence[PathLike] = (),
    ) -> None:
        super().__init__(
            name,
            _models.numpy_model(model, initial_ckpt),
            train_script,
            train_args,
            min_clients,
            num_rounds,
            evaluate_every=evaluate_every,
            files=files,
            aggregator_data_kind=aggregator_data_kind,
            launch_external_process=launch_external_process,
            params_transfer_type=params_transfer_type,
            key_metric=key_metric,
            client_memory_gc_rounds=client_memory_gc_rounds,
            _exchange=NUMPY,
        )


class FedAvgLrRecipe(FedAvgRecipe):
    """Federated logistic regression by Newton-Raphson: the model is ``num_features + 1`` weights (bias
    first) under ``numpy_key``, zeros unless ``initial_ckpt`` (a ``.npy`` file) gives them; sites send
    ``{"gradient", "hessian"}``, and the server steps by ``damping_factor`` times the Newton direction."""

    strategy = "fedavg_lr"

    def __init__(
        self,
        name: str = "lr_fedavg",
        min_clients: int = 1,
        num_rounds: int = 2,
        damping_factor: float = 0.8,
        num_features: int = 13,
        initial_ckpt: PathLike | None = None,
        train_script: PathLike | None = None,
        train_args: str | Sequence[Any] = (),
        *,
        launch_external_process: bool = False,
        client_memory_gc_rounds: int = 0,
        files: Sequence[PathLike] = (),
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ConfigError(f"num_features must be an integer >= 1, got {num_features!r}")
        start = np.zeros((num_features + 1, 1), dtype=np.float32) if initial_ckpt is None else None
        model = _models.numpy_model(start, initial_ckpt)
        shape = tuple(model[next(iter(model))].shape)
        if set(model) != {"numpy_key"} or shape != (num_features + 1, 1):
            raise ConfigError(f"initial_ckpt: holds an array of shape {shape}, expected ({num_features + 1}, 1)")
        super().__init__(
            name,
            model,
            train_script,
            train_args,
            min_clients,
            num_rounds,
            files=files,
            launch_external_process=launch_external_process,
            key_metric=None,
            client_memory_gc_rounds=client_memory_gc_rounds,
            _more={"damping_factor": damping_factor, "num_features": num_features},
            _exchange=NUMPY,
        )


class NumpyCrossSiteEvalRecipe(Recipe):
    """Cross-site evaluation of pre-trained numpy models, with no training: every site scores every server
    model; the matrix ``{model name: {site: metrics}}`` is ``run.cross_site``.

    The server models are ``initial_ckpt`` (a ``.npy`` file, named ``server``) or ``model_name``'s files
    (``{name: file.npy}``, default ``{"server": "server.npy"}``) in ``model_dir`` (default ``models``). The
    one named ``server`` (else the first) is the job's model; the others travel in the job folder as
    ``cross_site_models/NAME.safetensors``. With an ``eval_script`` the sites are also asked for their own
    models (``flare.is_submit_model()`` tasks), as FLARE's cross-site evaluation asks; the built-in
    evaluator has none. ``submit_model_timeout`` is accepted and ignored (a submit is a task like any other);
    ``validation_timeout`` (seconds) ends the evaluation with the cells it has.
    """

    strategy = "cross_site_eval"

    def __init__(
        self,
        name: str = "numpy_cross_site_eval",
        min_clients: int = 2,
        eval_script: PathLike | None = None,
        eval_args: str | Sequence[Any] = (),
        launch_external_process: bool = False,
        initial_ckpt: PathLike | None = None,
        model_dir: PathLike | None = None,
        model_name: Mapping[str, str] | None = None,
        submit_model_timeout: float = 600,
        validation_timeout: float | None = None,
        client_memory_gc_rounds: int = 0,
        files: Sequence[PathLike] = (),
    ) -> None:
        self.server_models = server_models(initial_ckpt, model_dir, model_name)
        own = GLOBAL_NAME if GLOBAL_NAME in self.server_models else next(iter(self.server_models))
        args = {
            "evaluate_global": own == GLOBAL_NAME,
            "submit_models": eval_script is not None,
            "timeout": validation_timeout,
        }
        super().__init__(
            name,
            self.server_models[own],
            eval_script if eval_script is not None else VALIDATOR_SCRIPT,
            eval_args,
            files,
            min_clients,
            args,
            launch_external_process=launch_external_process,
            client_memory_gc_rounds=client_memory_gc_rounds,
            exchange=NUMPY,
            script_arg="eval_script",
        )
        self.extra_models = {n: m for n, m in self.server_models.items() if n != GLOBAL_NAME}

    def _initial_model(self, model: Any, initial_ckpt: PathLike | None) -> dict[str, torch.Tensor]:
        return dict(model)

    def _write_more(self, root: Path) -> None:
        if self.extra_models:
            (root / SERVER_MODELS).mkdir()
            for n, model in self.extra_models.items():
                serde.write_file(root / SERVER_MODELS / f"{n}.safetensors", serde.layout(model))


def server_models(
    initial_ckpt: PathLike | None, model_dir: PathLike | None, model_name: Mapping[str, str] | None
) -> dict[str, dict[str, torch.Tensor]]:
    """The server models of a cross-site evaluation, by name, in order."""
    if initial_ckpt is not None:
        return {"server": _models.numpy_model(None, initial_ckpt)}
    names = dict(model_name) if model_name is not None else {"server": "server.npy"}
    if not names:
        raise ConfigError("model_name: names no model")
    folder = Path(model_dir if model_dir is not None else "models")
    out = {}
    for n, file in names.items():
        if not is_safe_name(n):
            raise ConfigError(f"model_name: {n!r} is not a model name ([A-Za-z0-9_.-])")
        if not isinstance(file, str | os.PathLike):
            raise ConfigError(f"model_name: the file of {n!r} must be a path, got {file!r}")
        try:
            out[n] = _models.numpy_model(None, folder / file)
        except ConfigError as exc:
            raise ConfigError(f"model_name: {n!r}: {exc}") from exc
    return out
