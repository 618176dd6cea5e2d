"""The worker pool on a Ray cluster: the simulated sites' tasks trained by Ray actors (optional extra ``ray``).

``RayPool(address="auto", workers=8, num_cpus=1, num_gpus=0.25)`` is a ``WorkerPool``
(``fedbus.recipes.simtime.pool``): ``workers`` actors, each reserving ``num_cpus`` CPUs and ``num_gpus`` of a GPU
(a fraction: four actors share a device at 0.25). Only the training moves to the cluster: the broker, the site
host and the simulated clock stay in this process, fedbus's own, and every model still goes through the broker.

* Connecting: ``address`` is what ``ray.init`` takes (``"auto"``: the cluster this machine belongs to,
  ``"ray://host:10001"``, or None: a new local instance). If this process is already connected to Ray, the pool
  uses that connection and leaves it open; otherwise it connects and disconnects on ``close``. fedbus (and the
  job's dependencies) must be importable on the cluster's nodes: installed there, or through ``runtime_env``.
* A job (``open``): its archive is put in Ray's object store once and every actor unpacks it into a folder of its
  own node's, then imports the script from there (``tasks.run_task``, as a thread worker does).
* A task (``submit``): goes to the actor with the fewest tasks in flight (an actor runs one task at a time, in the
  order given). The task travels without its model; the model travels as ``models`` says:
  ``"object_store"`` (default): put in the object store once per distinct model (the version's global model, the
  same bytes for every task of that version), as a uint8 array, and handed to every actor by reference: an actor
  on the same node reads it from shared memory without a copy, and a node fetches it once for all of its actors;
  ``"inline"``: the bytes are the task's argument, serialised with every task (what the model costs when each
  task carries its own copy, as on the bus).
* A GPU actor (``num_gpus > 0``) trains on the device Ray gives it, as a ``GpuWorkerPool`` worker does (the model
  straight to the device, the update back once), and gives its cached GPU memory back after every task
  (``torch.cuda.empty_cache``), so an idle actor holds no memory that the other actors on its device could use;
  no model stays on the device between tasks (a site's state comes back with its outcome).
* Reproducibility: an actor runs torch on ``torch_threads`` intra-op threads (1, as the simulated-time backend
  does in this process), so a task gives the same update on an actor as on a thread worker: the same recipe and
  seed give a bit-identical model whichever pool trains it. An actor also seeds torch's global generator from the
  task's seed before each task, so a script that draws from it is reproducible on any number of actors.
* Failure: an actor that dies (its node lost, out of memory) fails its task as the site's crash: the strategy
  sees the update lost, as in production.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import tempfile
import threading
import traceback
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedbus.errors import ConfigError
from fedbus.recipes.simtime.pool import JobCode, SiteTask, TaskOutcome

MODEL_MODES = ("object_store", "inline")
_KEEP_MODELS = 4
"""Distinct models kept in the object store by the pool (the newest; a task in flight keeps its own alive)."""


def _number(name: str, value: Any, low: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= low:
        raise ConfigError(f"{name} must be a number >= {low}, got {value!r}")
    return float(value)


def _same(a: bytes | memoryview, b: bytes | memoryview) -> bool:
    """Whether two models are the same bytes (a vectorised comparison: a memoryview's own compares per item)."""
    return len(a) == len(b) and np.array_equal(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8))


class SiteWorker:
    """A Ray actor's body: trains tasks for the jobs it was given (see the module docstring)."""

    def __init__(self, torch_threads: int, release_memory: bool) -> None:
        import torch

        from fedbus.recipes.simtime.gpu import Staging

        torch.set_num_threads(torch_threads)
        self.jobs: dict[str, JobCode] = {}
        self.root = Path(tempfile.mkdtemp(prefix="fedbus-ray-worker-"))
        self.release_memory = release_memory
        self.device = torch.device("cpu")
        self.stream: Any = None
        if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1"):
            self.device = torch.device("cuda", 0)  # Ray makes the GPU it gave this actor the only visible one
            self.stream = torch.cuda.Stream(self.device)
        self.staging = Staging()

    def open(self, job: JobCode, archive: Any) -> str:
        from fedbus.jobs import unpack_job

        folder = self.root / job.job_id
        folder.mkdir(parents=True, exist_ok=True)
        unpack_job(bytes(archive), folder, require_model=False, check_strategy=False)
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))  # the script imports its job's other files, as on a site
        sys.argv = [str(folder / job.script), *job.args]
        self.jobs[job.job_id] = replace(job, folder=folder, archive=b"")
        return str(self.device)

    def run(self, task: SiteTask, model: Any) -> TaskOutcome:
        from fedbus.recipes.simtime.gpu import run_on_device

        job = self.jobs.get(task.job_id)
        if job is None:
            return TaskOutcome(error=f"job {task.job_id} was not opened on this Ray worker")
        if model is not None:
            task = replace(task, model=memoryview(model).cast("B"))  # read in place
        import torch

        torch.manual_seed(task.seed)  # a script drawing from the global generator: the task's, on any actor
        return run_on_device(job, task, self.device, self.stream, self.staging, self.release_memory)

    def close(self) -> None:
        from fedbus.recipes.simtime.tasks import forget_job

        for job_id in self.jobs:
            forget_job(job_id)


class RayPool:
    """``workers`` Ray actors training the simulated sites' tasks (see the module docstring)."""

    def __init__(
        self,
        address: str | None = "auto",
        workers: int = 2,
        *,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        models: str = "object_store",
        torch_threads: int = 1,
        runtime_env: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
        if address is not None and (not isinstance(address, str) or not address):
            raise ConfigError(f"address must be a Ray address, 'auto' or None, got {address!r}")
        self.num_cpus = _number("num_cpus", num_cpus, 0.0)
        self.num_gpus = _number("num_gpus", num_gpus, 0.0)
        if self.num_gpus > 1 and not self.num_gpus.is_integer():
            raise ConfigError(f"num_gpus above 1 must be a whole number of GPUs, got {num_gpus!r}")
        if models not in MODEL_MODES:
            raise ConfigError(f"models must be one of {MODEL_MODES}, got {models!r}")
        if isinstance(torch_threads, bool) or not isinstance(torch_threads, int) or torch_threads < 1:
            raise ConfigError(f"torch_threads must be an integer >= 1, got {torch_threads!r}")
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("RayPool needs Ray: pip install 'fedbus[ray]'") from exc
        self.ray = ray
        self.workers = workers
        self.models = models
        self._connected = False
        if not ray.is_initialized():
            ray.init(address=address, runtime_env=runtime_env, include_dashboard=False, log_to_driver=False)
            self._connected = True
        actor = ray.remote(SiteWorker).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_concurrency=1)
        self.actors: list[Any] = [actor.remote(torch_threads, self.num_gpus > 0) for _ in range(workers)]
        self.devices: list[str] = []
        self._lock = threading.Lock()
        self._inflight = [0] * workers
        self._models: OrderedDict[tuple[str, int, int], tuple[bytes | memoryview, Any]] = OrderedDict()
        self.jobs: set[str] = set()

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Wait until every actor has started (a worker process each; its first task would wait otherwise)."""
        self.ray.get([a.__ray_ready__.remote() for a in self.actors], timeout=timeout)

    def open(self, job: JobCode) -> None:
        archive = self.ray.put(np.frombuffer(job.archive, dtype=np.uint8))
        # Calls from this process to one actor run in the order made: each actor unpacks before its first task.
        refs = [a.open.remote(replace(job, archive=b""), archive) for a in self.actors]
        self.jobs.add(job.job_id)
        if not self.devices:
            self.devices = self.ray.get(refs)

    def submit(self, task: SiteTask) -> concurrent.futures.Future[TaskOutcome]:
        model = self._model_arg(task)
        with self._lock:
            i = min(range(self.workers), key=self._inflight.__getitem__)
            self._inflight[i] += 1
        out: concurrent.futures.Future[TaskOutcome] = concurrent.futures.Future()
        try:
            ref = self.actors[i].run.remote(replace(task, model=None), model)
            done = ref.future()
        except Exception:
            self._finished(i)
            out.set_result(TaskOutcome(error=traceback.format_exc()))
            return out

        def resolve(f: concurrent.futures.Future[TaskOutcome]) -> None:
            self._finished(i)
            try:
                out.set_result(f.result())
            except BaseException as exc:  # the actor died or Ray failed the call: the site's task is lost
                out.set_result(TaskOutcome(error=f"Ray worker {i} failed the task: {exc!r}"))

        done.add_done_callback(resolve)
        return out

    def _finished(self, i: int) -> None:
        with self._lock:
            self._inflight[i] -= 1

    def _model_arg(self, task: SiteTask) -> Any:
        if task.model is None or self.models == "inline":
            return None if task.model is None else bytes(task.model)
        key = (task.job_id, task.version, len(task.model))
        cached = self._models.get(key)
        if cached is not None and _same(cached[0], task.model):
            self._models.move_to_end(key)
            return cached[1]
        ref = self.ray.put(np.frombuffer(task.model, dtype=np.uint8))
        self._models[key] = (task.model, ref)
        while len(self._models) > _KEEP_MODELS:
            self._models.popitem(last=False)
        return ref

    def close(self) -> None:
        """Stop the actors (and disconnect from Ray if this pool connected)."""
        self._models.clear()
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self._connected:
            self.ray.shutdown()
            self._connected = False
