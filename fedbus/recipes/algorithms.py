"""FLARE's PyTorch recipes beyond FedAvg: FedProx, SCAFFOLD, FedOpt, cyclic and evaluation-only.

Each is the job of one strategy of ``fedbus.strategy`` (``fedprox``, ``scaffold``, ``fedopt``, ``cyclic``,
``fedeval``) under FLARE's recipe name and argument names (``nvflare.app_opt.pt.recipes.*``), with FLARE's
default job names. What the sites must do differently (FedProx's proximal term, SCAFFOLD's control
variates) travels in the strategy's task options, so training scripts stay as FLARE users wrote them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedbus.client.constants import DataKind, TransferType
from fedbus.errors import ConfigError
from fedbus.recipes.recipe import FedAvgRecipe, ModelLike, PathLike, Recipe


class FedProxRecipe(FedAvgRecipe):
    """FedAvg on the server; each site adds ``fedprox_mu / 2 * ||w - w_global||^2`` to its training loss
    (the client API and the Lightning patch apply it, given ``fedprox_mu`` in the task's options)."""

    strategy = "fedprox"

    def __init__(
        self,
        name: str = "fedprox",
        model: ModelLike | None = None,
        train_script: PathLike | None = None,
        train_args: str | Sequence[Any] = (),
        min_clients: int = 1,
        num_rounds: int = 2,
        fedprox_mu: float = 0.01,
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
            model,
            train_script,
            train_args,
            min_clients,
            num_rounds,
            evaluate_every=evaluate_every,
            files=files,
            initial_ckpt=initial_ckpt,
            aggregator_data_kind=aggregator_data_kind,
            launch_external_process=launch_external_process,
            params_transfer_type=params_transfer_type,
            key_metric=key_metric,
            client_memory_gc_rounds=client_memory_gc_rounds,
            _more={"fedprox_mu": fedprox_mu},
        )


class ScaffoldRecipe(FedAvgRecipe):
    """SCAFFOLD: the global model travels with the server's control variates, and each site keeps its own
    (the client API corrects the local steps and sends weight and control differences)."""

    strategy = "scaffold"

    def __init__(
        self,
        name: str = "scaffold",
        model: ModelLike | None = None,
        train_script: PathLike | None = None,
        train_args: str | Sequence[Any] = (),
        min_clients: int = 1,
        num_rounds: int = 2,
        *,
        server_lr: float | None = None,
        initial_ckpt: PathLike | None = None,
        launch_external_process: bool = False,
        params_transfer_type: TransferType | str = TransferType.FULL,
        key_metric: str | None = "accuracy",
        client_memory_gc_rounds: int = 0,
        evaluate_every: int = 0,
        files: Sequence[PathLike] = (),
    ) -> None:
        super().__init__(
            name,
            model,
            train_script,
            train_args,
            min_clients,
            num_rounds,
            evaluate_every=evaluate_every,
            files=files,
            initial_ckpt=initial_ckpt,
            launch_external_process=launch_external_process,
            params_transfer_type=params_transfer_type,
            key_metric=key_metric,
            client_memory_gc_rounds=client_memory_gc_rounds,
            _more={"server_lr": server_lr},
        )


_TORCH_OPTIMIZERS = {"sgd": "sgd", "adam": "adam", "adagrad": "adagrad", "yogi": "yogi"}


def _class_config(config: Any, what: str) -> tuple[str, dict[str, Any]]:
    """FLARE's ``{"path" | "class_path": "torch.optim.X", "args": {...}}``: the class name and its args."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{what} must be a dict, got {type(config).__name__}")
    unknown = set(config) - {"path", "class_path", "args", "config_type"}
    if unknown:
        raise ConfigError(f"{what}: unknown key(s) {sorted(unknown)} (path, args)")
    args = config.get("args") or {}
    if not isinstance(args, Mapping):
        raise ConfigError(f"{what}: args must be a dict, got {type(args).__name__}")
    return str(config.get("path", config.get("class_path", ""))), dict(args)


def optimizer_from_args(optimizer_args: Mapping[str, Any]) -> dict[str, Any]:
    """FLARE's ``{"path": "torch.optim.SGD", "args": {"lr": 1.0, "momentum": 0.6}}`` as the fedopt strategy's
    arguments (``server_optimizer``, ``server_lr``, ``server_momentum``, ``betas``, ``tau`` from ``eps``)."""
    path, args = _class_config(optimizer_args, "optimizer_args")
    path = path or "torch.optim.SGD"
    kind = _TORCH_OPTIMIZERS.get(path.rpartition(".")[2].lower())
    if kind is None:
        raise ConfigError(f"optimizer_args: {path!r} is not one of SGD, Adam, Adagrad, Yogi")
    out: dict[str, Any] = {"server_optimizer": kind, "server_lr": float(args.pop("lr", 1.0))}
    if "momentum" in args:
        if kind != "sgd":
            raise ConfigError(f"optimizer_args: momentum is an SGD argument, not {path}'s")
        out["server_momentum"] = float(args.pop("momentum"))
    if "betas" in args:
        out["betas"] = [float(b) for b in args.pop("betas")]
    if "eps" in args:
        out["tau"] = float(args.pop("eps"))
    if args:
        raise ConfigError(f"optimizer_args: {path} argument(s) {sorted(args)} not supported (lr, momentum, betas, eps)")
    return out


def schedule_from_args(lr_scheduler_args: Mapping[str, Any], num_rounds: int) -> dict[str, Any]:
    """FLARE's ``{"path": "torch.optim.lr_scheduler.CosineAnnealingLR", "args": {"T_max": ..., "eta_min": x}}``
    as the fedopt strategy's cosine schedule over the job's rounds (``T_max`` must be ``num_rounds``)."""
    path, args = _class_config(lr_scheduler_args, "lr_scheduler_args")
    if path.rpartition(".")[2] != "CosineAnnealingLR":
        raise ConfigError(f"lr_scheduler_args: {path!r} is not supported (CosineAnnealingLR is)")
    t_max = args.pop("T_max", num_rounds)
    if t_max not in (num_rounds, "{num_rounds}"):
        raise ConfigError(f"lr_scheduler_args: T_max must be num_rounds ({num_rounds}), got {t_max!r}")
    out: dict[str, Any] = {"lr_schedule": "cosine", "server_lr_min": float(args.pop("eta_min", 0.0))}
    if args:
        raise ConfigError(f"lr_scheduler_args: argument(s) {sorted(args)} not supported (T_max, eta_min)")
    return out


class FedOptRecipe(FedAvgRecipe):
    """FedOpt (Reddi et al.): the averaged update is a pseudo-gradient for a server optimizer: SGD with
    momentum, Adam, Yogi or Adagrad.

    Give the optimizer as FLARE does, ``optimizer_args={"path": "torch.optim.SGD", "args": {"lr": 1.0,
    "momentum": 0.6}}`` (``eps`` is ``tau``) and ``lr_scheduler_args`` (CosineAnnealingLR over the rounds),
    or directly with the strategy's names: ``server_optimizer``, ``server_lr``, ``server_momentum``,
    ``betas``, ``tau``, ``lr_schedule``, ``server_lr_min``.
    """

    strategy = "fedopt"

    def __init__(
        self,
        name: str = "fedopt",
        model: ModelLike | None = None,
        train_script: PathLike | None = None,
        train_args: str | Sequence[Any] = (),
        min_clients: int = 1,
        num_rounds: int = 2,
        optimizer_args: Mapping[str, Any] | None = None,
        lr_scheduler_args: Mapping[str, Any] | None = None,
        *,
        server_optimizer: str | None = None,
        server_lr: float | None = None,
        server_momentum: float | None = None,
        betas: Sequence[float] | None = None,
        tau: float | None = None,
        lr_schedule: str | None = None,
        server_lr_min: float | None = None,
        initial_ckpt: PathLike | None = None,
        launch_external_process: bool = False,
        key_metric: str | None = "accuracy",
        client_memory_gc_rounds: int = 0,
        evaluate_every: int = 0,
        files: Sequence[PathLike] = (),
    ) -> None:
        direct = {
            "server_optimizer": server_optimizer,
            "server_lr": server_lr,
            "server_momentum": server_momentum,
            "betas": list(betas) if betas is not None else None,
            "tau": tau,
        }
        schedule = {"lr_schedule": lr_schedule, "server_lr_min": server_lr_min}
        more = {k: v for k, v in direct.items() if v is not None}
        if optimizer_args is not None:
            if more:
                raise ConfigError(f"optimizer_args and {', '.join(sorted(more))}: give the optimizer one way")
            more = optimizer_from_args(optimizer_args)
        if lr_scheduler_args is not None:
            if any(v is not None for v in schedule.values()):
                raise ConfigError("lr_scheduler_args and lr_schedule/server_lr_min: give the schedule one way")
            more.update(schedule_from_args(lr_scheduler_args, num_rounds))
        else:
            more.update({k: v for k, v in schedule.items() if v is not None})
        super().__init__(
            name,
            model,
            train_script,
            train_args,
            min_clients,
            num_rounds,
            evaluate_every=evaluate_every,
            files=files,
            initial_ckpt=initial_ckpt,
            launch_external_process=launch_external_process,
            key_metric=key_metric,
            client_memory_gc_rounds=client_memory_gc_rounds,
            _more=more,
        )


class CyclicRecipe(Recipe):
    """Cyclic weight transfer: the model visits the sites in turn, each training on the previous site's
    result; ``num_rounds`` passes over the sites, in a ``"fixed"`` or ``"random"`` (``seed``) ``order``."""

    strategy = "cyclic"

    def __init__(
        self,
        name: str = "cyclic",
        model: ModelLike | None = None,
        train_script: PathLike | None = None,
        train_args: str | Sequence[Any] = (),
        num_rounds: int = 2,
        min_clients: int = 2,
        *,
        order: str | None = None,
        seed: int | None = None,
        initial_ckpt: PathLike | None = None,
        launch_external_process: bool = False,
        params_transfer_type: TransferType | str = TransferType.FULL,
        client_memory_gc_rounds: int = 0,
        files: Sequence[PathLike] = (),
    ) -> None:
        super().__init__(
            name,
            model,
            train_script,
            train_args,
            files,
            min_clients,
            {"num_rounds": num_rounds, "min_clients": min_clients, "order": order, "seed": seed},
            initial_ckpt=initial_ckpt,
            launch_external_process=launch_external_process,
            params_transfer_type=params_transfer_type,
            client_memory_gc_rounds=client_memory_gc_rounds,
        )

    @property
    def total(self) -> int | None:
        return None  # versions per pass depend on how many sites take part


class FedEvalRecipe(Recipe):
    """Evaluation only: every site scores one model (``model`` with the weights of ``eval_ckpt``) on its
    own data with ``eval_script``; nothing is trained. The metrics are in ``run.evaluations``.

    ``validation_timeout`` (seconds) ends the evaluation with the reports it has.
    """

    strategy = "fedeval"

    def __init__(
        self,
        name: str = "eval",
        model: ModelLike | None = None,
        eval_ckpt: PathLike | None = None,
        min_clients: int = 1,
        eval_script: PathLike | None = None,
        eval_args: str | Sequence[Any] = (),
        *,
        launch_external_process: bool = False,
        validation_timeout: float | None = None,
        client_memory_gc_rounds: int = 0,
        files: Sequence[PathLike] = (),
    ) -> None:
        super().__init__(
            name,
            model,
            eval_script,
            eval_args,
            files,
            min_clients,
            {"min_clients": min_clients, "eval_timeout": validation_timeout},
            initial_ckpt=eval_ckpt,
            launch_external_process=launch_external_process,
            client_memory_gc_rounds=client_memory_gc_rounds,
            script_arg="eval_script",
            ckpt_arg="eval_ckpt",
        )
