"""The worker pool: whatever trains the simulated sites' tasks, behind one small interface.

A simulated site is a record, not a process: when the broker gives it a task, the site host hands the task to
a ``WorkerPool`` and, once the pool answers, uploads the result as that site. What the pool does is its own
business, so the same simulation runs on local threads (``ThreadWorkerPool``, here), on a GPU or on a Ray
cluster: an implementation needs three methods.

``open(job)``
    A job starts: ``job`` (``JobCode``) names its unpacked folder, its script and arguments, and the number of
    sites. A remote pool ships the folder (or its archive, ``job.archive``) to its workers here.
``submit(task) -> concurrent.futures.Future[TaskOutcome]``
    Train (or evaluate) one site's task. ``task`` (``SiteTask``) carries the site's record (name, index),
    the global model as safetensors bytes (``task.model``: the received stream's buffer itself, read-only, which
travels to a Ray actor or a GPU as it is; a pool that pickles tasks makes its own ``bytes``), the
    task's kind, version and options, and ``task.seed``, derived from (run seed, site, task) so that a task
    trains the same way whichever worker runs it. The future resolves to a ``TaskOutcome``: the update's
    params (a state dict on the CPU, or None), its type, weight and metrics, ``compute_s`` (the seconds the
    worker measured: the simulated clock may scale them by the site's speed), and ``error`` (a traceback:
    the site's script crashed) or ``state`` (see below). ``submit`` is called on the simulator's event loop
    and must not block; the future may resolve on any thread.
``close()``
    The simulation is over: stop the workers.

Per-site state: a site's script may keep state between its tasks (SCAFFOLD's control variates, personal
layers). The host keeps it in the site's record and sends it with each task (``task.state``, a dict, None the
first time); the outcome carries it back (``outcome.state``). A remote pool therefore needs no affinity
between sites and workers.

How a task runs (``fedbus.recipes.simtime.tasks.run_task``, what every implementation calls in its worker):
the job's script either defines ``run_task(site, model) -> FLModel`` (the function form: ``site`` is a
``SiteContext``), or it is a FLARE-style script (``flare.init(); while flare.is_running(): ...``) that is
executed once per task with a client-API session that ends after its one ``send``.

``ThreadWorkerPool(n)`` runs tasks on ``n`` threads of this process. torch's global random generator is one
per process, so a script that draws from it (rather than from ``site.generator``, or a generator seeded from
the task's ``seed``) is reproducible with one worker only (which seeds it from the task's seed before each task,
as the process and Ray pools do in each of theirs); everything else is reproducible whatever ``n``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class JobCode:
    """A job's code as the workers need it: the unpacked folder, the script in it, its arguments."""

    job_id: str
    folder: Path
    script: str
    args: tuple[str, ...]
    num_sites: int
    archive: bytes = b""
    privacy: Mapping[str, Any] = field(default_factory=dict)
    """The job's ``[extra.privacy]``: its filters (exclusion, DP) run on every update, as at a real site."""


@dataclass(frozen=True)
class SiteTask:
    """One site's task, as a pool worker gets it (see the module docstring)."""

    job_id: str
    task_id: str
    site: str
    index: int
    kind: str
    version: int
    round: int
    total_rounds: int
    model: bytes | memoryview | None
    params_type: str | None
    options: Mapping[str, Any]
    seed: int
    state: dict[str, Any] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class TaskOutcome:
    """What a worker returns for a task."""

    params: dict[str, torch.Tensor] | None = None
    params_type: str = "FULL"
    weight: float = 1.0
    metrics: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    compute_s: float = 0.0
    error: str | None = None
    state: dict[str, Any] | None = None


class WorkerPool(Protocol):
    """Trains the simulated sites' tasks (see the module docstring)."""

    workers: int

    def open(self, job: JobCode) -> None: ...

    def submit(self, task: SiteTask) -> concurrent.futures.Future[TaskOutcome]: ...

    def close(self) -> None: ...


def task_seed(seed: int, site: str, task_id: str) -> int:
    """A task's seed from the run's seed, the site and the task (63 bits): the same in every run and worker."""
    h = hashlib.blake2b(f"{seed}/{site}/{task_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


class ThreadWorkerPool:
    """``workers`` threads of this process (see the module docstring)."""

    def __init__(self, workers: int = 1) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        self.workers = workers
        self.jobs: dict[str, JobCode] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="fedbus-simworker")

    def open(self, job: JobCode) -> None:
        self.jobs[job.job_id] = job

    def submit(self, task: SiteTask) -> concurrent.futures.Future[TaskOutcome]:
        from fedbus.recipes.simtime.tasks import run_task

        if self.workers == 1:
            return self._executor.submit(_seeded, self.jobs[task.job_id], task)
        return self._executor.submit(run_task, self.jobs[task.job_id], task)

    def close(self) -> None:
        from fedbus.recipes.simtime.tasks import forget_job

        self._executor.shutdown(wait=True, cancel_futures=True)
        for job_id in self.jobs:
            forget_job(job_id)


def _seeded(job: JobCode, task: SiteTask) -> TaskOutcome:
    """``run_task`` with torch's global generator seeded from the task's seed (the only worker of its process)."""
    from fedbus.recipes.simtime.tasks import run_task

    torch.manual_seed(task.seed)
    return run_task(job, task)
