"""Recipes: a federated job defined in Python, exported as the job folder that ``fedbus submit`` takes.

Why a recipe writes a folder instead of talking to a broker itself: one job format, two doors. What a
recipe executes in SimEnv, PocEnv or ProdEnv is exactly the folder ``recipe.export(path)`` leaves on
disk (job.toml written by :func:`fedbus.jobs.write_job_toml`, the script and its files, the initial model
as ``model.safetensors``), so a job tried in the simulator can be handed to an operator as files, and a
bug in one door is a bug in the other.

Arguments are checked when the recipe is built, not when it runs: the strategy is resolved once with
:func:`fedbus.strategy.make_strategy` (a typo in an argument is a ConfigError at once, naming it), the
script and the extra files must exist, and the model is read in any form ``_models`` takes. The model is
copied when the recipe is built: a recipe is a value, and training the module further afterwards does not
change what the job starts from.

The arguments FLARE's recipes share keep FLARE's names and meanings: ``train_args`` as one string (split
as a shell would) or a list, ``initial_ckpt``, ``launch_external_process`` (SimEnv runs the script in a
process of its own instead of a thread), ``key_metric``, ``client_memory_gc_rounds``,
``params_transfer_type`` and ``aggregator_data_kind`` (DIFF: sites send ``local - received``). They land
in job.toml's ``[client]`` and ``[tracking]`` tables, which the sites' client API and the broker read.
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedbus import jobs
from fedbus.client.constants import DataKind, TransferType
from fedbus.config import is_safe_name
from fedbus.errors import ConfigError
from fedbus.modelio import serde
from fedbus.recipes import _models
from fedbus.strategy import make_strategy

if TYPE_CHECKING:
    from fedbus.recipes.run import Run

ModelLike = nn.Module | Mapping[str, Any] | str | os.PathLike[str]
PathLike = str | os.PathLike[str]
MODEL_FILE = "model.safetensors"
_RESERVED = frozenset({jobs.JOB_TOML, MODEL_FILE})
_MODEL_KINDS = (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF)


def script_args(args: str | Sequence[Any] | None, what: str = "train_args") -> tuple[str, ...]:
    """A script's arguments: one string split as a shell would (FLARE's form), or a sequence of them."""
    if args is None:
        return ()
    if isinstance(args, str):
        try:
            return tuple(shlex.split(args))
        except ValueError as exc:
            raise ConfigError(f"{what}: cannot split {args!r}: {exc}") from exc
    if not isinstance(args, Sequence):
        raise ConfigError(f"{what} must be a string or a list of arguments, not {type(args).__name__}")
    out = []
    for a in args:
        if isinstance(a, bool) or not isinstance(a, str | int | float):
            raise ConfigError(f"{what}: {a!r} is not a string or a number")
        out.append(str(a))
    return tuple(out)


def _enum(cls: type[Any], value: Any, what: str, allowed: Sequence[Any]) -> Any:
    try:
        member = cls(value.upper() if isinstance(value, str) else value)
    except ValueError:
        member = None
    if member not in allowed:
        raise ConfigError(f"{what} must be one of {', '.join(str(a) for a in allowed)}, got {value!r}")
    return member


def transfer_type(params_transfer_type: Any, aggregator_data_kind: Any) -> str:
    """What sites send, from FLARE's two arguments: DIFF if either asks for differences, else FULL."""
    t = _enum(TransferType, params_transfer_type, "params_transfer_type", list(TransferType))
    kind = _enum(DataKind, aggregator_data_kind or DataKind.WEIGHTS, "aggregator_data_kind", _MODEL_KINDS)
    return "DIFF" if t == TransferType.DIFF or kind == DataKind.WEIGHT_DIFF else "FULL"


class Recipe:
    """What every recipe shares: the script, its files, the model, the strategy's checked arguments, and
    the job's ``[client]`` / ``[tracking]`` / ``[cross_site_eval]`` settings."""

    strategy: str
    """The strategy's registered name, or ``"module:Class"`` for a Strategy subclass of the user's own (a
    module beside the training script ships with the job)."""

    def __init__(
        self,
        name: str,
        model: ModelLike | None,
        train_script: PathLike | None,
        train_args: str | Sequence[Any] | None,
        files: Sequence[PathLike],
        min_sites: int,
        strategy_args: Mapping[str, Any],
        *,
        initial_ckpt: PathLike | None = None,
        launch_external_process: bool = False,
        key_metric: str | None = None,
        client_memory_gc_rounds: int = 0,
        params_transfer_type: TransferType | str = TransferType.FULL,
        aggregator_data_kind: DataKind | str | None = DataKind.WEIGHTS,
        exchange: str = "pytorch",
        script_arg: str = "train_script",
        ckpt_arg: str = "initial_ckpt",
        strategy: str | None = None,
    ) -> None:
        if not is_safe_name(name):
            raise ConfigError(f"name must be 1-64 characters from [A-Za-z0-9_.-], got {name!r}")
        self.name = name
        if train_script is None:
            raise ConfigError(f"{script_arg} is required (the script each site runs)")
        self.train_script = Path(train_script).resolve()
        if not self.train_script.is_file():
            raise ConfigError(f"{script_arg}: {train_script} is not a file")
        self.train_args = script_args(train_args, "eval_args" if script_arg == "eval_script" else "train_args")
        self.files: tuple[Path, ...] = tuple()  # not (): mypy would take it as empty for all of __init__
        for f in files:
            self._add_file(f, "files")
        if isinstance(min_sites, bool) or not isinstance(min_sites, int) or min_sites < 1:
            raise ConfigError(f"min_sites must be an integer >= 1, got {min_sites!r}")
        self.min_sites = min_sites
        self.strategy_args = {k: v for k, v in strategy_args.items() if v is not None}  # TOML has no null
        if strategy is not None:
            if not isinstance(strategy, str) or ":" not in strategy:
                raise ConfigError(f"strategy must be 'module:StrategyClass', got {strategy!r}")
            self.strategy = strategy
        try:
            with _models.script_imports(self.train_script.parent):
                make_strategy(self.strategy, **self.strategy_args)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{type(self).__name__}: {exc}") from exc
        if ":" in self.strategy:
            source = _models.local_source(self.strategy.partition(":")[0], self.train_script.parent)
            if source is not None and source.name not in {f.name for f in self.files}:
                self.files = (*self.files, source)

        self.client: dict[str, Any] = {}
        if exchange != "pytorch":
            self.client["exchange"] = exchange
        if transfer_type(params_transfer_type, aggregator_data_kind) == "DIFF":
            self.client["transfer_type"] = "DIFF"
        gc_rounds = client_memory_gc_rounds
        if isinstance(gc_rounds, bool) or not isinstance(gc_rounds, int) or gc_rounds < 0:
            raise ConfigError(f"client_memory_gc_rounds must be an integer >= 0, got {gc_rounds!r}")
        if gc_rounds:
            self.client["memory_gc_rounds"] = gc_rounds
        if not isinstance(launch_external_process, bool):
            raise ConfigError(f"launch_external_process must be True or False, got {launch_external_process!r}")
        if launch_external_process:
            self.client["external_process"] = True
        self.tracking: dict[str, Any] = {}
        if key_metric is not None:
            if not isinstance(key_metric, str) or not 0 < len(key_metric) <= 128:
                raise ConfigError(f"key_metric must be a metric name, got {key_metric!r}")
            self.tracking["key_metric"] = key_metric
        self.cross_site_eval = False
        self.extra: dict[str, Any] = {}
        self._ckpt_arg = ckpt_arg
        self.model = self._initial_model(model, initial_ckpt)

    def _initial_model(self, model: Any, initial_ckpt: PathLike | None) -> dict[str, torch.Tensor]:
        """The torch forms of ``model`` (numpy recipes override this); the module of a model class defined
        in the script's folder ships with the job, as FLARE ships it."""
        state, source = _models.torch_model(model, initial_ckpt, self.train_script.parent, ckpt_arg=self._ckpt_arg)
        taken = {self.train_script.name, *(f.name for f in self.files)}
        if source is not None and source.name not in taken:  # a file of that name given by the user wins
            self.files = (*self.files, source)
        return state

    def _add_file(self, path: PathLike, what: str) -> None:
        f = Path(path).resolve()
        if not f.exists():
            raise ConfigError(f"{what}: {f} does not exist")
        if f in self.files:  # already shipped (the model's own module is, automatically)
            return
        names = [self.train_script.name, *(g.name for g in self.files), f.name]
        clash = sorted({n for n in names if names.count(n) > 1} | (set(names) & _RESERVED))
        if clash:
            raise ConfigError(f"{what}: the name {clash[0]!r} is used twice (or by job.toml / {MODEL_FILE})")
        self.files = (*self.files, f)

    # --- FLARE's recipe methods ---------------------------------------------------------------------------

    def add_client_file(self, file_path: PathLike, clients: Sequence[str] | None = None) -> None:
        """Ship one more file or folder with the job (beside the script, in every site's job folder)."""
        if clients is not None:
            raise ConfigError("add_client_file: clients= is not supported: every site gets the same job folder")
        self._add_file(file_path, "add_client_file")

    def enable_log_streaming(self, *file_names: str) -> None:
        """Send each site's script output (stdout and stderr) to the broker, into ``logs/<site>.log`` of the
        job's folder there. FLARE's ``file_names`` (which log files to tail) are accepted and ignored: a
        fedbus site has one output stream per script, and that is what travels."""
        self.client["log_streaming"] = True

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
            extra=dict(self.extra),
            client=dict(self.client),
            tracking={k: list(v) if isinstance(v, list) else v for k, v in self.tracking.items()},
            cross_site_eval=self.cross_site_eval,
        )

    def export(self, folder: PathLike | None = None, *, job_dir: PathLike | None = None) -> Path:
        """Write the job folder and check it as ``fedbus submit`` would; returns the folder.

        ``folder`` is the job folder itself (a new or empty directory). ``job_dir`` is FLARE's form: the
        job goes to ``job_dir/<name>``, replacing an earlier export there.
        """
        if (folder is None) == (job_dir is None):
            raise ConfigError("export needs exactly one of folder or job_dir")
        if job_dir is not None:
            root = Path(job_dir) / self.name
            if (root / jobs.JOB_TOML).is_file():
                shutil.rmtree(root)
        else:
            root = Path(folder)  # type: ignore[arg-type]
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
        self._write_more(root)
        jobs.write_job_toml(self.job_spec(), root / jobs.JOB_TOML)
        with _models.script_imports(root):  # a strategy of the user's own is imported from the job folder
            jobs.load_job_folder(root)
        return root

    def _write_more(self, root: Path) -> None:
        """Files a recipe adds to the job folder besides the script, its files and the model."""

    def execute(self, env: Any, wait: bool = True) -> Run:
        """Run this job in ``env`` (SimEnv, PocEnv or ProdEnv); with ``wait=False`` returns the handle at once."""
        run: Run = env.execute(self, wait=wait)
        return run

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.strategy_args.items())
        return f"{type(self).__name__}({self.name!r}, script={self.train_script.name!r}, {args})"


class FedAvgRecipe(Recipe):
    """Synchronous FedAvg: ``num_rounds`` rounds of at least ``min_clients`` results each.

    FLARE's ``aggregator_data_kind=DataKind.WEIGHT_DIFF`` (or ``params_transfer_type=TransferType.DIFF``)
    makes sites send ``local - received``; FedAvg averages either form.

    ``strategy="mymodule:MyStrategy"`` replaces FedAvg by a Strategy subclass of your own (FLARE's custom
    aggregator): it gets the same arguments (``min_clients``, ``num_rounds``, ...), and declares the inputs
    it accepts with ``input_spec()`` / ``validate_input()``.

    ``secure_aggregation={"threshold": 3, "clip": 8.0}`` sums the sites' updates under secure aggregation: the
    broker learns only the round's mean (``fedbus.strategy.secure_fedavg``, docs/security.md).
    """

    strategy = "fedavg"

    def __init__(
        self,
        name: str = "fedavg",
        model: ModelLike | None = None,
        train_script: PathLike | None = None,
        train_args: str | Sequence[Any] = (),
        min_clients: int = 1,
        num_rounds: int = 2,
        max_clients: int | None = None,
        round_timeout: float | None = None,
        time_budget: float | None = None,
        evaluate_every: int = 0,
        files: Sequence[PathLike] = (),
        min_sites: int | None = None,
        *,
        initial_ckpt: PathLike | None = None,
        aggregator_data_kind: DataKind | str | None = DataKind.WEIGHTS,
        launch_external_process: bool = False,
        params_transfer_type: TransferType | str = TransferType.FULL,
        key_metric: str | None = "accuracy",
        client_memory_gc_rounds: int = 0,
        strategy: str | None = None,
        secure_aggregation: Mapping[str, Any] | None = None,
        _more: Mapping[str, Any] | None = None,
        _exchange: str = "pytorch",
    ) -> None:
        args = {
            "secure_aggregation": dict(secure_aggregation) if secure_aggregation is not None else None,
            "min_clients": min_clients,
            "num_rounds": num_rounds,
            "max_clients": max_clients,
            "round_timeout": round_timeout,
            "time_budget": time_budget,
            "evaluate_every": evaluate_every or None,
            **(_more or {}),
        }
        super().__init__(
            name,
            model,
            train_script,
            train_args,
            files,
            min_sites or min_clients,
            args,
            initial_ckpt=initial_ckpt,
            launch_external_process=launch_external_process,
            key_metric=key_metric,
            client_memory_gc_rounds=client_memory_gc_rounds,
            params_transfer_type=params_transfer_type,
            aggregator_data_kind=aggregator_data_kind,
            exchange=_exchange,
            strategy=strategy,
        )

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
        train_script: PathLike,
        train_args: str | Sequence[Any] = (),
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
        files: Sequence[PathLike] = (),
        *,
        initial_ckpt: PathLike | None = None,
        launch_external_process: bool = False,
        key_metric: str | None = None,
        client_memory_gc_rounds: int = 0,
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
        super().__init__(
            name,
            model,
            train_script,
            train_args,
            files,
            min_clients,
            args,
            initial_ckpt=initial_ckpt,
            launch_external_process=launch_external_process,
            key_metric=key_metric,
            client_memory_gc_rounds=client_memory_gc_rounds,
        )

    @property
    def total(self) -> int | None:
        n = self.strategy_args.get("num_versions")
        return int(n) if n is not None else None
