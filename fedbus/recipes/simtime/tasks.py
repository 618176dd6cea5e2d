"""Running one simulated site's task in a worker: the job's script, in one of two forms.

The function form: the script defines ``run_task(site, model) -> FLModel``. ``site`` is a :class:`SiteContext`
(name, index, number of sites, the task's kind/version/options, ``seed`` and a ``generator`` seeded from it,
and ``state``: a dict kept between this site's tasks); ``model`` is the global model as an ``FLModel``.
The script is imported once per job and worker process (not as ``__main__``), so its module-level code (data
generation, a model class) runs once, however many sites train.

The FLARE form: any script written for the client API (``flare.init()``, ``while flare.is_running()``,
``receive``, ``send``) is executed as ``__main__`` once per task, in the worker's thread, with a client
session of its own (``OneTaskSession``) that holds this one task: ``is_running()`` is True until the task's
``send`` and False after, so the script's loop ends after one task, as a site's script would end if its job
had one task. ``flare.system_info()`` gives the site's index and count, so the script loads the site's part of
the data. The session turns the result into what a site would upload (FULL or DIFF as the strategy asks, the
weight from ``NUM_STEPS_CURRENT_ROUND``, SCAFFOLD's controls), in memory, without files.

On a GPU worker (``fedbus.recipes.simtime.gpu``), ``run_task`` is given the worker's ``device``: the function
form's model arrives there (``site.device``), the FLARE form's on the CPU as on a real site; the update comes back
to the CPU once, whatever device the script left it on.

``run_task`` never raises: a script's exception is the outcome's ``error``.
"""

from __future__ import annotations

import builtins
import importlib.util
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, ModuleType
from typing import Any

import torch

from fedbus.client.api import bind_thread
from fedbus.client.constants import FLMetaKey
from fedbus.client.model import FLModel, ParamsType, diff_params, plain_values, to_cpu_params
from fedbus.client.options import TaskOptions
from fedbus.client.scaffold import ScaffoldState
from fedbus.client.session import ClientSession
from fedbus.errors import ConfigError, LocalProtocolError
from fedbus.modelio import serde
from fedbus.protocol.messages import Task
from fedbus.recipes.simtime.gpu import Staging, load_model, state_to_host, to_host
from fedbus.recipes.simtime.pool import JobCode, SiteTask, TaskOutcome
from fedbus.site.filters import FilterContext, GaussianDP, apply_filters, job_filters

FUNCTION = "run_task"
"""The name of the function form's entry point in a job's script."""
WEIGHT_KEY = "NUM_STEPS_CURRENT_ROUND"
DP_SEED = 0x5EED_D1FF
"""Mixed into a task's seed for its DP noise: the noise differs from what the script draws from the same seed."""


@dataclass
class SiteContext:
    """What the function form's ``run_task(site, model)`` learns about its site and task."""

    name: str
    index: int
    num_sites: int
    kind: str
    version: int
    round: int
    total_rounds: int
    options: Mapping[str, Any]
    seed: int
    generator: torch.Generator
    state: dict[str, Any] = field(default_factory=dict)
    params_type: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where the task's model is, and where the worker trains (a CUDA device on a GPU worker)."""


class _Code:
    """A job's script, loaded once: its module (function form) or its compiled code (FLARE form)."""

    _lock = threading.Lock()
    _cache: dict[tuple[str, Path], _Code] = {}

    def __init__(self, job: JobCode) -> None:
        self.path = job.folder / job.script
        self.source: CodeType = compile(self.path.read_bytes(), str(self.path), "exec")
        self.module: ModuleType | None = None
        if f"def {FUNCTION}(" in self.path.read_text(encoding="utf-8", errors="replace"):
            spec = importlib.util.spec_from_file_location(f"fedbus_sim_job_{abs(hash(job.job_id))}", self.path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            if callable(getattr(module, FUNCTION, None)):
                self.module = module

    @classmethod
    def forget(cls, job_id: str) -> None:
        """Drop a job's loaded script (its pool closed)."""
        with cls._lock:
            for key in [k for k in cls._cache if k[0] == job_id]:
                del cls._cache[key]

    @classmethod
    def of(cls, job: JobCode) -> _Code:
        key = (job.job_id, job.folder)
        with cls._lock:
            code = cls._cache.get(key)
            if code is None:
                code = cls._cache[key] = cls(job)
            return code


def forget_job(job_id: str) -> None:
    """Forget what ``run_task`` loaded for a job (a pool calls it when it closes)."""
    _Code.forget(job_id)


def run_task(
    job: JobCode, task: SiteTask, *, device: torch.device | None = None, staging: Staging | None = None
) -> TaskOutcome:
    """Run ``task`` with the job's script (see the module docstring), on ``device`` (default: the CPU; a GPU
    worker passes its device and staging buffer, and runs this with that device and its stream current);
    never raises."""
    started = time.perf_counter()
    device = device or torch.device("cpu")
    try:
        code = _Code.of(job)
        state = dict(task.state) if task.state is not None else {}
        if code.module is not None:
            model = load_model(task.model, device, staging) if task.model is not None else None
            outcome = _run_function(code.module, job, task, model, state, device)
        else:
            model = serde.load_bytes(task.model) if task.model is not None else None
            outcome = _run_flare(code, job, task, model, state)
        if job.privacy and outcome.params is not None and task.kind == "train":
            outcome.params = _filtered(job, task, outcome)
        outcome.state = state_to_host(state) if device.type == "cuda" else state
    except BaseException:  # a script's failure is its site's crash, never the simulator's
        outcome = TaskOutcome(error=traceback.format_exc())
    outcome.compute_s = time.perf_counter() - started
    return outcome


def _filtered(job: JobCode, task: SiteTask, outcome: TaskOutcome) -> dict[str, torch.Tensor]:
    """The update after the job's privacy filters (``fedbus.site.filters``: exclusion, then clipping and
    Gaussian noise), as a site applies them before upload; the noise drawn from the task's seed, so a seeded
    simulation stays reproducible. The base is the model as received (the script may have changed its copy)."""
    assert outcome.params is not None
    filters = job_filters({"privacy": job.privacy})
    for f in filters:
        if isinstance(f, GaussianDP):
            f.generator = torch.Generator().manual_seed(task.seed ^ DP_SEED)
    base = serde.load_bytes(task.model) if task.model is not None else None
    ctx = FilterContext(task.job_id, task.task_id, outcome.params_type, base)
    return apply_filters(filters, outcome.params, ctx)


def _run_function(
    module: ModuleType,
    job: JobCode,
    task: SiteTask,
    model: dict[str, torch.Tensor] | None,
    state: dict[str, Any],
    device: torch.device,
) -> TaskOutcome:
    site = SiteContext(
        name=task.site,
        index=task.index,
        num_sites=job.num_sites,
        kind=task.kind,
        version=task.version,
        round=task.round,
        total_rounds=task.total_rounds,
        options=task.options,
        seed=task.seed,
        generator=torch.Generator().manual_seed(task.seed),
        state=state,
        params_type=task.params_type,
        device=device,
    )
    given = FLModel(params=model, meta=_meta_of(task), current_round=task.round, total_rounds=task.total_rounds)
    out = getattr(module, FUNCTION)(site, given)
    if not isinstance(out, FLModel):
        raise ConfigError(f"{FUNCTION}() must return an FLModel, got {type(out).__name__}")
    return outcome_of(task, out, model, None)


def outcome_of(
    task: SiteTask, out: FLModel, received: dict[str, torch.Tensor] | None, scaffold: ScaffoldState | None
) -> TaskOutcome:
    """A script's result as a site would upload it: FULL or DIFF as asked, weighted by its step count."""
    metrics = plain_values(out.metrics or {}, "FLModel.metrics")
    meta = plain_values(out.meta or {}, "FLModel.meta")
    weight = meta.get(WEIGHT_KEY) or 1.0
    if not isinstance(weight, int | float) or isinstance(weight, bool) or weight < 0:
        raise ConfigError(f"meta[{WEIGHT_KEY!r}] must be a number >= 0, got {weight!r}")
    params_type = ParamsType(out.params_type or ParamsType.FULL)
    params = None
    if task.kind in ("train", "submit_model") and out.params is not None:
        params = _tensors(out.params)  # where the script left them: a GPU worker's diff is taken on its device
        controls: dict[str, torch.Tensor] = {}
        if scaffold is not None and scaffold.open and task.kind == "train":
            params = to_host(params)
            controls = scaffold.finish(params, is_diff=params_type is ParamsType.DIFF)
        wants_diff = task.params_type == "DIFF" or TaskOptions.parse(task.options).transfer_type == "DIFF"
        if task.kind == "train" and wants_diff and params_type is ParamsType.FULL:
            if received is None:
                raise ConfigError(f"cannot send DIFF for task {task.task_id}: the task carried no model")
            params, params_type = diff_params(params, _alongside(received, params)), ParamsType.DIFF
        params = {**to_host(params), **controls}
    return TaskOutcome(params=params, params_type=str(params_type), weight=float(weight), metrics=metrics, meta=meta)


def _tensors(params: Any) -> dict[str, torch.Tensor]:
    """A script's params as detached tensors on their device (anything else validated and put on the CPU)."""
    if isinstance(params, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in params.items()
    ):
        return {k: v.detach() for k, v in params.items()}
    return to_cpu_params(params)


def _alongside(received: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The received tensors on the devices of the script's (a diff needs both sides on one device)."""
    out = dict(received)
    for k, v in params.items():
        base = out.get(k)
        if base is not None and base.device != v.device:
            out[k] = base.to(v.device)
    return out


class OneTaskSession(ClientSession):
    """A client session holding one task, in memory (the FLARE form; see the module docstring)."""

    def __init__(self, job: JobCode, task: SiteTask, model: dict[str, torch.Tensor] | None, state: dict) -> None:
        super().__init__(
            link="",
            token="",
            job_id=task.job_id,
            site_name=task.site,
            site_index=task.index,
            num_sites=job.num_sites,
            workspace=job.folder,
        )
        self.sim_task = task
        self.sim_model = model
        self.sim_state = state
        self.scaffold = state.setdefault("scaffold", ScaffoldState())
        self.outcome: TaskOutcome | None = None
        self._wire = Task(
            job_id=task.job_id,
            task_id=task.task_id,
            kind=task.kind,
            version=task.version,
            round=task.round,
            total_rounds=task.total_rounds,
            options=dict(task.options),
            params_type=task.params_type,
        )
        self._base: dict[str, torch.Tensor] | None = None

    def init(self) -> None:
        pass

    def close(self) -> None:
        pass

    def is_running(self) -> bool:
        return self.outcome is None

    def receive(self, timeout: float | None = None) -> FLModel | None:
        if self.outcome is not None:
            return None
        self._current = self._wire
        if self._received is None and self.sim_model is not None:
            self._base = {k: v.clone() for k, v in self.sim_model.items()}  # the script may train in place
            self._received = self._take_controls(self._wire, TaskOptions.parse(self._wire.options), self.sim_model)
        meta = _meta_of(self.sim_task)
        return FLModel(
            params=self._received,
            params_type=ParamsType.FULL,
            meta=meta,
            current_round=self.sim_task.round,
            total_rounds=self.sim_task.total_rounds,
        )

    def send(self, model: FLModel, clear_cache: bool = True) -> bool:
        """Take the task's result; True: in a simulation the result is delivered (at its simulated time) unless
        its site leaves first, which the strategy sees as production would, after the script has returned."""
        if not isinstance(model, FLModel):
            raise ConfigError(f"send() takes an FLModel, got {type(model).__name__}")
        if self.outcome is not None:
            raise LocalProtocolError("send() twice for one task")
        base = None if self._base is None else {k: v for k, v in self._base.items() if k in (self._received or {})}
        self.outcome = outcome_of(self.sim_task, model, base, self.scaffold)
        if not self.scaffold.c_local:  # no SCAFFOLD: the site's record keeps nothing for it
            self.sim_state.pop("scaffold", None)
        return True

    def log(self, *args: Any, **kwargs: Any) -> None:
        """Metrics a script logs in a simulation are dropped (the broker's history has the aggregate's)."""


def _meta_of(task: SiteTask) -> dict[str, Any]:
    out = {**task.meta, "version": task.version, "job_id": task.job_id, "task_id": task.task_id}
    out.update(site_name=task.site, seed=task.seed)
    if task.params_type is not None:
        out["params_type"] = task.params_type
    out.update({FLMetaKey.CURRENT_ROUND: task.round, FLMetaKey.TOTAL_ROUNDS: task.total_rounds})
    return out


def _run_flare(
    code: _Code, job: JobCode, task: SiteTask, model: dict[str, torch.Tensor] | None, state: dict[str, Any]
) -> TaskOutcome:
    session = OneTaskSession(job, task, model, state)
    bind_thread(session)
    try:
        namespace: dict[str, Any] = {"__name__": "__main__", "__file__": str(code.path), "__builtins__": builtins}
        namespace.update(__package__=None, __spec__=None, __loader__=None, __cached__=None, __doc__=None)
        try:
            exec(code.source, namespace)
        except SystemExit as exc:
            if exc.code not in (None, 0):
                raise
    finally:
        bind_thread(None)
    if session.outcome is None:
        raise LocalProtocolError(f"the script ended without sending a result for task {task.task_id}")
    return session.outcome
