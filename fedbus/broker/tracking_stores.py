"""Where sites' tracking records land at the broker: TensorBoard, an MLflow file store, W&B offline runs.

Each store takes checked records (``fedbus.broker.tracking.Record``) of one job and writes them; all of them run
in the job's tracking thread (``JobSink``), never on the event loop. Any writer's records go to every store the
job names in ``[tracking] types``, as FLARE's receivers take every writer's records.

* TensorBoard: the broker's per-job ``SummaryWriter`` (``metrics.BoardWriters``, ``<job>/tensorboard``) with
  each site's records under ``<site>/<key>``, next to the broker's own curves.
* MLflow: a file store at ``<job>/mlruns``, one experiment per job name and one run per site (named
  ``<site>-<job id>``, tagged ``fedbus.site`` / ``fedbus.job_id``), as FLARE's MLflowReceiver keeps one run per
  site. MLflow 3 puts the file store behind ``MLFLOW_ALLOW_FILE_STORE``; the store sets it (to ``true``, unless
  the environment says otherwise) because a job's folder must stay readable without a database server.
* W&B: one offline run per site under ``<job>/wandb`` (project = job name, group = job id), never online: the
  broker does not reach the network for a job's records. ``wandb sync`` uploads them later if wanted.
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fedbus.log import get_logger

if TYPE_CHECKING:
    from fedbus.broker.metrics import BoardWriters
    from fedbus.broker.tracking import Record

log = get_logger("broker.tracking")

TYPES = ("tensorboard", "mlflow", "wandb")


class Store(Protocol):
    def write(self, site: str, rec: Record) -> None: ...

    def close(self) -> None: ...


def available(kind: str) -> bool:
    """Whether the package a tracking type writes with is installed."""
    return importlib.util.find_spec(kind) is not None


def _flat(rec: Record) -> dict[str, Any]:
    """A record as ``{name: value}``: one entry for a single value; a dict's entries under their own names for
    MLflow's ``log_metrics``/``log_params`` (kinds ``metrics``, ``params``), under ``key/name`` for TensorBoard's
    ``add_scalars`` (kind ``scalars``)."""
    if isinstance(rec.value, dict) and rec.kind in ("metrics", "params"):
        return dict(rec.value)
    if isinstance(rec.value, dict):
        return {f"{rec.key}/{k}": v for k, v in rec.value.items()}
    return {rec.key: rec.value}


class BoardStore:
    """Sites' records in the job's TensorBoard event files, tag ``<site>/<key>`` (scalars) or text."""

    def __init__(self, boards: BoardWriters, job_id: str) -> None:
        self.boards = boards
        self.job_id = job_id
        self._steps: defaultdict[str, int] = defaultdict(int)  # tag -> next step, for records without one

    def _step(self, tag: str, step: int | None) -> int:
        if step is None:
            step = self._steps[tag]
        self._steps[tag] = step + 1
        return step

    def write(self, site: str, rec: Record) -> None:
        for name, value in _flat(rec).items():
            tag = f"{site}/{name}"
            if rec.kind in ("param", "params", "text"):
                self.boards.text(self.job_id, tag, str(value), self._step(tag, rec.step))
            else:
                self.boards.scalar(self.job_id, tag, float(value), self._step(tag, rec.step))

    def close(self) -> None:
        """The job's writer belongs to ``BoardWriters``: the job's end closes it."""


_ARTIFACT_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class MlflowStore:
    """One MLflow run per site in ``<job>/mlruns``; metrics and params written in batches."""

    def __init__(self, job_dir: Path, job_id: str, job_name: str) -> None:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.uri = (job_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.job_id = job_id
        exp = self.client.get_experiment_by_name(job_name)
        self.experiment_id = exp.experiment_id if exp is not None else self.client.create_experiment(job_name)
        self.runs: dict[str, str] = {}

    def _run(self, site: str) -> str:
        run_id = self.runs.get(site)
        if run_id is None:
            name = f"{site}-{self.job_id}"
            found = self.client.search_runs([self.experiment_id], filter_string=f"tags.`mlflow.runName` = '{name}'")
            if found:  # records after the job's end, or after a broker restart: the site's run goes on
                run_id = found[0].info.run_id
            else:
                tags = {"fedbus.site": site, "fedbus.job_id": self.job_id}
                run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            self.runs[site] = run_id
        return run_id

    def write(self, site: str, rec: Record) -> None:
        from mlflow.entities import Metric, Param

        run_id = self._run(site)
        values = _flat(rec)
        if rec.kind in ("param", "params"):
            self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in values.items()])
        elif rec.kind == "text":
            self.client.log_text(run_id, str(rec.value), f"{_ARTIFACT_SAFE.sub('_', rec.key)}.txt")
        else:
            now = int(time.time() * 1000)
            metrics = [Metric(k, float(v), now, rec.step or 0) for k, v in values.items()]
            self.client.log_batch(run_id, metrics=metrics)

    def close(self) -> None:
        for run_id in self.runs.values():
            self.client.set_terminated(run_id)
        self.runs.clear()


class WandbStore:
    """One W&B offline run per site in ``<job>/wandb``.

    W&B writes through a service process it starts with the first run; the last store to close (no job's runs
    left open in this broker) tears it down, so no process outlives the jobs that needed it."""

    _open = 0
    _open_lock = threading.Lock()

    def __init__(self, job_dir: Path, job_id: str, job_name: str) -> None:
        import wandb

        with WandbStore._open_lock:
            WandbStore._open += 1

        self.wandb = wandb
        self.dir = job_dir
        self.job_id = job_id
        self.job_name = job_name
        self.runs: dict[str, Any] = {}
        self._last_step: dict[str, int] = {}

    def _run(self, site: str) -> Any:
        run = self.runs.get(site)
        if run is None:
            settings = self.wandb.Settings(silent=True, disable_git=True, save_code=False, x_disable_stats=True)
            run = self.runs[site] = self.wandb.init(
                project=self.job_name,
                group=self.job_id,
                name=f"{site}-{self.job_id}",
                dir=str(self.dir),
                mode="offline",
                reinit="create_new",
                config={"site": site, "job_id": self.job_id},
                settings=settings,
            )
        return run

    def write(self, site: str, rec: Record) -> None:
        run = self._run(site)
        if rec.kind in ("param", "params"):
            run.config.update(_flat(rec), allow_val_change=True)
            return
        # W&B keeps one step counter per run and drops records logged at a step behind it: a record whose step
        # went backwards (another key counted in epochs, say) is logged at the run's current step instead.
        last = self._last_step.get(site, -1)
        if rec.step is not None and rec.step >= last:
            self._last_step[site] = rec.step
            run.log(_flat(rec), step=rec.step)
        else:
            run.log(_flat(rec), step=max(last, 0))

    def close(self) -> None:
        try:
            for run in self.runs.values():
                run.finish()
        finally:
            self.runs.clear()
            with WandbStore._open_lock:
                WandbStore._open -= 1
                if WandbStore._open == 0:
                    self.wandb.teardown()


def open_store(kind: str, *, job_dir: Path, job_id: str, job_name: str, boards: BoardWriters | None) -> Store | None:
    """The store of one tracking type, or None (logged) when its package is missing."""
    if kind == "tensorboard":
        if boards is None or not boards.enabled:
            log.warning("tracking to tensorboard skipped: tensorboard is not installed", job=job_id)
            return None
        return BoardStore(boards, job_id)
    if not available(kind):
        log.warning(f"tracking to {kind} skipped: install fedbus[{kind}]", job=job_id)
        return None
    if kind == "mlflow":
        return MlflowStore(job_dir, job_id, job_name)
    if kind == "wandb":
        return WandbStore(job_dir, job_id, job_name)
    raise ValueError(f"unknown tracking type {kind!r}")
