"""Recipes: a federated job defined in Python, exported as the job folder that ``fedbus submit`` takes.

Why a recipe writes a folder instead of talking to a broker itself: one job format, two doors. What a
recipe executes in SimEnv, PocEnv or ProdEnv is exactly the folder ``recipe.export(path)`` leaves on
disk (job.toml written by :func:`fedbus.jobs.write_job_toml`, the script and its files, the initial model
as ``model.safetensors``), so a job tried in the simulator can be handed to an operator as files, and a
bug in one door is a bug in the other.

Arguments are checked when the recipe is built, not when it runs: the strategy is resolved once with
:func:`fedbus.strategy.make_strategy` (a typo in an argument is a ConfigError at once, naming it), the
script and the extra files must exist, and the model must be an ``nn.Module``, a state_dict or a
``.safetensors`` file. The model is copied when the recipe is built: a recipe is a value, and training
the module further afterwards does not change what the job starts from.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from fedbus import jobs
from fedbus.config import is_safe_name
from fedbus.errors import ConfigError, FedbusError
from fedbus.modelio import serde
from fedbus.strategy import make_strategy

if TYPE_CHECKING:
    from fedbus.recipes.run import Run

ModelLike = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike[str]
MODEL_FILE = "model.safetensors"
_RESERVED = frozenset({jobs.JOB_TOML, MODEL_FILE})


def model_state(model: ModelLike) -> dict[str, torch.Tensor]:
    """The initial global model as a private CPU state_dict (detached copies), or ConfigError."""
    if isinstance(model, nn.Module):
        state: Mapping[str, Any] = model.state_dict()
    elif isinstance(model, Mapping):
        state = model
    elif isinstance(model, str | os.PathLike):
        path = Path(model)
        if path.suffix != ".safetensors" or not path.is_file():
            raise ConfigError(f"model: {path} is not a .safetensors file")
        try:
            state = serde.read_file(path)
        except (FedbusError, OSError) as exc:
            raise ConfigError(f"model: cannot read {path}: {exc}") from exc
    else:
        raise ConfigError(
            f"model must be an nn.Module, a state_dict or a .safetensors path, not {type(model).__name__}"
        )
    if not state:
        raise ConfigError("model: the state_dict is empty")
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise ConfigError(f"model: entry {name!r} must map a name to a tensor")
        out[name] = t.detach().to("cpu", copy=True).contiguous()
    return out


def _script_args(args: Sequence[Any]) -> tuple[str, ...]:
    if isinstance(args, str):
        raise ConfigError("train_args must be a sequence of arguments, not one string (split it)")
    out = []
    for a in args:
        if isinstance(a, bool) or not isinstance(a, str | int | float):
            raise ConfigError(f"train_args: {a!r} is not a string or a number")
        out.append(str(a))
    return tuple(out)


class Recipe:
    """What every recipe shares: the script, its files, the model, and the strategy's checked arguments."""

    strategy: ClassVar[str]

    def __init__(
        self,
        name: str,
        model: ModelLike,
        train_script: str | os.PathLike[str],
        train_args: Sequence[Any],
        files: Sequence[str | os.PathLike[str]],
        min_sites: int,
        strategy_args: Mapping[str, Any],
    ) -> None:
        if not is_safe_name(name):
            raise ConfigError(f"name must be 1-64 characters from [A-Za-z0-9_.-], got {name!r}")
        self.name = name
        self.train_script = Path(train_script).resolve()
        if not self.train_script.is_file():
            raise ConfigError(f"train_script: {train_script} is not a file")
        self.train_args = _script_args(train_args)
        self.files = tuple(Path(f).resolve() for f in files)
        names = [self.train_script.name]
        for f in self.files:
            if not f.exists():
                raise ConfigError(f"files: {f} does not exist")
            names.append(f.name)
        clash = sorted({n for n in names if names.count(n) > 1} | (set(names) & _RESERVED))
        if clash:
            raise ConfigError(f"files: the name {clash[0]!r} is used twice (or by job.toml / {MODEL_FILE})")
        if isinstance(min_sites, bool) or not isinstance(min_sites, int) or min_sites < 1:
            raise ConfigError(f"min_sites must be an integer >= 1, got {min_sites!r}")
        self.min_sites = min_sites
        self.strategy_args = {k: v for k, v in strategy_args.items() if v is not None}  # TOML has no null
        try:
            make_strategy(self.strategy, **self.strategy_args)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{type(self).__name__}: {exc}") from exc
        self.model = model_state(model)

    @property
    def total(self) -> int | None:
        """How many global versions the job aims for (None when only a time budget stops it)."""
        return None

    def job_spec(self) -> jobs.JobSpec:
        """The job.toml this recipe stands for."""
        return jobs.JobSpec(
            name=self.name,
            model=MODEL_FILE,
            strategy=self.strategy,
            strategy_args=dict(self.strategy_args),
            script=self.train_script.name,
            script_args=self.train_args,
            min_sites=self.min_sites,
        )

    def export(self, folder: str | os.PathLike[str]) -> Path:
        """Write the job folder (a new or empty directory) and check it as ``fedbus submit`` would."""
        root = Path(folder)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise ConfigError(f"{root}: export needs a new or empty directory")
        root.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.train_script, root / self.train_script.name)
        for f in self.files:
            if f.is_dir():
                shutil.copytree(f, root / f.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(f, root / f.name)
        serde.write_file(root / MODEL_FILE, serde.layout(self.model, {"recipe": self.name}))
        jobs.write_job_toml(self.job_spec(), root / jobs.JOB_TOML)
        jobs.load_job_folder(root)
        return root

    def execute(self, env: Any, wait: bool = True) -> Run:
        """Run this job in ``env`` (SimEnv, PocEnv or ProdEnv); with ``wait=False`` returns the handle at once."""
        run: Run = env.execute(self, wait=wait)
        return run

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.strategy_args.items())
        return f"{type(self).__name__}({self.name!r}, script={self.train_script.name!r}, {args})"


class FedAvgRecipe(Recipe):
    """Synchronous FedAvg: ``num_rounds`` rounds of at least ``min_clients`` results each."""

    strategy = "fedavg"

    def __init__(
        self,
        name: str,
        model: ModelLike,
        train_script: str | os.PathLike[str],
        train_args: Sequence[Any] = (),
        min_clients: int = 1,
        num_rounds: int = 1,
        max_clients: int | None = None,
        round_timeout: float | None = None,
        time_budget: float | None = None,
        evaluate_every: int = 0,
        files: Sequence[str | os.PathLike[str]] = (),
        min_sites: int | None = None,
    ) -> None:
        args = {
            "min_clients": min_clients,
            "num_rounds": num_rounds,
            "max_clients": max_clients,
            "round_timeout": round_timeout,
            "time_budget": time_budget,
            "evaluate_every": evaluate_every or None,
        }
        super().__init__(name, model, train_script, train_args, files, min_sites or min_clients, args)

    @property
    def total(self) -> int | None:
        return int(self.strategy_args["num_rounds"])


class FedBuffRecipe(Recipe):
    """Asynchronous buffered aggregation: ``concurrency`` sites busy, a new version every ``buffer_size``
    updates, until ``num_versions`` or ``time_budget``; training scripts need no change (the client API
    turns their FULL weights into the deltas FedBuff wants)."""

    strategy = "fedbuff"

    def __init__(
        self,
        name: str,
        model: ModelLike,
        train_script: str | os.PathLike[str],
        train_args: Sequence[Any] = (),
        concurrency: int = 2,
        buffer_size: int = 2,
        num_versions: int | None = None,
        time_budget: float | None = None,
        max_staleness: int | None = None,
        staleness: str = "polynomial",
        staleness_kwargs: Mapping[str, float] | None = None,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        server_optimizer: str = "sgd",
        min_clients: int = 1,
        evaluate_every: int = 0,
        files: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        args = {
            "concurrency": concurrency,
            "buffer_size": buffer_size,
            "num_versions": num_versions,
            "time_budget": time_budget,
            "max_staleness": max_staleness,
            "staleness": staleness,
            "staleness_kwargs": dict(staleness_kwargs) if staleness_kwargs else None,
            "server_lr": server_lr,
            "server_momentum": server_momentum or None,
            "server_optimizer": server_optimizer,
            "evaluate_every": evaluate_every or None,
        }
        super().__init__(name, model, train_script, train_args, files, min_clients, args)

    @property
    def total(self) -> int | None:
        n = self.strategy_args.get("num_versions")
        return int(n) if n is not None else None
