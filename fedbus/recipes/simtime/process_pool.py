"""The worker pool as processes of this machine: reproducible with several workers whatever the script draws from.

``ProcessWorkerPool(workers)`` is a ``WorkerPool`` (``fedbus.recipes.simtime.pool``) of ``workers`` processes
(started with ``spawn``: the simulator's process runs an event loop and threads, which a fork would copy
half-way). Each process seeds torch's global random generator from the task's seed before every task, so a script
that draws from it (``torch.randn(...)`` without a generator, ``torch.randperm``, dropout, a ``DataLoader``'s
shuffle) trains a task the same way whichever process runs it: unlike the thread pool, whose threads share one
global generator, the same recipe and seed then give the same model for any number of workers.

A process imports the job's script once (from the job's folder on this machine, added to its ``sys.path``, with the
job's arguments as its ``sys.argv``) and runs torch on one intra-op thread, as the thread workers do. The task and
its outcome cross the process boundary pickled (the model's safetensors bytes down, the update's tensors up): for
large models, threads cost less.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import sys
import traceback
from dataclasses import replace

from fedbus.errors import ConfigError
from fedbus.recipes.simtime.pool import JobCode, SiteTask, TaskOutcome

_opened: set[str] = set()
"""The jobs this worker process has set up (``sys.path``, ``sys.argv``)."""


def _start_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _run_in_worker(job: JobCode, task: SiteTask) -> TaskOutcome:
    import torch

    from fedbus.recipes.simtime.tasks import run_task

    if job.job_id not in _opened:
        folder = str(job.folder)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        sys.argv = [str(job.folder / job.script), *job.args]
        _opened.add(job.job_id)
    torch.manual_seed(task.seed)  # this process's global generator: the task's, whichever process runs it
    return run_task(job, task)


class ProcessWorkerPool:
    """``workers`` processes of this machine (see the module docstring)."""

    def __init__(self, workers: int = 2) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
        self.workers = workers
        self.jobs: dict[str, JobCode] = {}
        self._executor = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker
        )

    def open(self, job: JobCode) -> None:
        self.jobs[job.job_id] = replace(job, archive=b"")  # the folder is on this machine: no archive to ship

    def submit(self, task: SiteTask) -> concurrent.futures.Future[TaskOutcome]:
        out: concurrent.futures.Future[TaskOutcome] = concurrent.futures.Future()
        try:
            model = bytes(task.model) if task.model is not None else None  # pickled: a buffer of its own
            done = self._executor.submit(_run_in_worker, self.jobs[task.job_id], replace(task, model=model))
        except Exception:
            out.set_result(TaskOutcome(error=traceback.format_exc()))
            return out

        def resolve(f: concurrent.futures.Future[TaskOutcome]) -> None:
            try:
                out.set_result(f.result())
            except BaseException as exc:  # a worker process died: the site's task is lost
                out.set_result(TaskOutcome(error=f"worker process failed the task: {exc!r}"))

        done.add_done_callback(resolve)
        return out

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
