"""Training simulated sites on GPUs: several worker threads per device, models straight from the bus to the GPU.

``GpuWorkerPool(gpus="all", workers_per_gpu=4)`` is a ``WorkerPool`` (``fedbus.recipes.simtime.pool``) whose
workers are threads of this process, ``workers_per_gpu`` bound to each CUDA device: worker ``i`` trains on device
``gpus[i % len(gpus)]``, on a CUDA stream of its own, so the workers of one device overlap their copies and kernels.
Threads, not processes, share a device: they share one CUDA context and one caching allocator, so memory freed by
one worker's task is reused by the next task of any worker without going back to the driver.

How a model travels (``load_model`` and ``to_host``):

* Down: the task's model is a safetensors file in bytes (as the site host received it from the broker). It is
  copied once into the worker's page-locked staging buffer (kept and grown per worker) and from there to the device
  in one asynchronous copy of the whole file; the tensors the script gets are views of that one device buffer.
  A pageable source would cost the same host copy inside the driver, plus a synchronous transfer per tensor.
* Up: the update's tensors (on the device) are copied into one page-locked host buffer, one asynchronous copy each,
  with one synchronisation at the end; the CPU tensors handed back are views of that buffer, and the site host
  streams them to the broker from there (``ModelSource`` lays tensors out by reference, without another copy).

The function form (``run_task(site, model)``) gets its model's params on ``site.device`` and may return them
there. A FLARE-form script gets CPU params, as on a real site, and runs with its worker's device as the current
CUDA device, so its ``"cuda"`` is that worker's GPU. Per-site state (``site.state``) comes back to the CPU after
every task: a site's next task may run on another device, or another machine.

``release_memory=True`` returns the allocator's cached blocks to the driver after every task
(``torch.cuda.empty_cache``): for processes that share a device with others (Ray actors), not for threads of one
process, where the cache is what lets the next task allocate nothing.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedbus.errors import ConfigError
from fedbus.modelio import serde
from fedbus.recipes.simtime.pool import JobCode, SiteTask, TaskOutcome

_ALIGN = 64
"""Byte alignment of each tensor in ``to_host``'s buffer (enough for every dtype and for vectorised copies)."""


def check_gpus(gpus: Any) -> int | list[int] | str:
    """``gpus`` checked (not against the devices present): ``"all"``, a number >= 1, or distinct indices >= 0."""
    if gpus == "all":
        return "all"
    if isinstance(gpus, int) and not isinstance(gpus, bool):
        if gpus < 1:
            raise ConfigError(f"gpus must be >= 1 device, got {gpus}")
        return gpus
    if isinstance(gpus, str | bytes) or not isinstance(gpus, Sequence):
        raise ConfigError(f"gpus must be 'all', a number of devices or a list of device indices, got {gpus!r}")
    indices = list(gpus)
    if not indices or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
        raise ConfigError(f"gpus must list device indices (integers >= 0), got {gpus!r}")
    if len(set(indices)) != len(indices):
        raise ConfigError(f"gpus names a device twice: {gpus!r}")
    return indices


def cuda_devices(gpus: int | Sequence[int] | str) -> list[torch.device]:
    """The CUDA devices ``gpus`` names: ``"all"`` (every visible one), a count (the first N), or indices."""
    checked = check_gpus(gpus)
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if checked == "all" and available == 0:
        raise ConfigError("gpus='all': no CUDA device is visible to torch")
    if isinstance(checked, str):
        indices = list(range(available))
    else:
        indices = list(range(checked)) if isinstance(checked, int) else checked
    missing = [i for i in indices if i >= available]
    if missing:
        raise ConfigError(f"gpus={gpus!r}: CUDA device(s) {missing} not visible ({available} visible)")
    return [torch.device("cuda", i) for i in indices]


class Staging:
    """A worker's page-locked host buffer for models on their way to its device, grown as needed."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def take(self, nbytes: int) -> torch.Tensor:
        """A page-locked uint8 buffer of ``nbytes`` (valid until the next ``take``: the caller synchronises first)."""
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8, pin_memory=True)
        return self.buffer[:nbytes]


def load_model(
    data: bytes | bytearray | memoryview, device: torch.device, staging: Staging | None = None
) -> dict[str, torch.Tensor]:
    """A safetensors file in memory, as tensors on ``device``: views of one buffer (see the module docstring).

    On a CUDA device the copy is asynchronous on the current stream: work queued after it on that stream sees
    the tensors; the staging buffer must not be reused before the stream has passed the copy.
    """
    if device.type != "cuda":
        return serde.load_bytes(data)
    mv = memoryview(data).cast("B")
    data_start, specs, _ = serde.parse_header(mv, max_total=mv.nbytes, total=mv.nbytes)
    host = (staging or Staging()).take(mv.nbytes)
    host.numpy()[:] = np.frombuffer(mv, dtype=np.uint8)
    on_device = host.to(device, non_blocking=True)
    return serde.tensors_from_buffer(on_device, specs, data_start)


def to_host(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``params`` on the CPU: CPU tensors as they are (contiguous), CUDA tensors copied once into one page-locked
    buffer, one asynchronous copy each and one synchronisation; the results are views of that buffer."""
    on_gpu = [k for k, v in params.items() if v.is_cuda]
    out = {k: v.detach().contiguous() for k, v in params.items() if not v.is_cuda}
    if not on_gpu:
        return {k: out[k] for k in params}
    offsets, total = {}, 0
    for k in on_gpu:
        offsets[k] = total
        total += -(-params[k].nbytes // _ALIGN) * _ALIGN
    buf = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=True)
    streams = set()
    for k in on_gpu:
        v = params[k].detach()
        view = buf[offsets[k] : offsets[k] + v.nbytes].view(v.dtype).view(v.shape)
        view.copy_(v, non_blocking=True)
        out[k] = view
        streams.add(torch.cuda.current_stream(v.device))
    for stream in streams:
        stream.synchronize()
    return {k: out[k] for k in params}


def state_to_host(value: Any) -> Any:
    """A site's state with every tensor in it (in dicts, lists, tuples) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu() if value.is_cuda else value
    if isinstance(value, dict):
        return {k: state_to_host(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(state_to_host(v) for v in value)
    return value


class GpuWorkerPool:
    """``workers_per_gpu`` worker threads on each of ``gpus`` (see the module docstring)."""

    def __init__(
        self, gpus: int | Sequence[int] | str = "all", workers_per_gpu: int = 4, *, release_memory: bool = False
    ) -> None:
        if isinstance(workers_per_gpu, bool) or not isinstance(workers_per_gpu, int) or workers_per_gpu < 1:
            raise ConfigError(f"workers_per_gpu must be an integer >= 1, got {workers_per_gpu!r}")
        self.devices = cuda_devices(gpus)
        self.workers = workers_per_gpu * len(self.devices)
        self.release_memory = release_memory
        self.jobs: dict[str, JobCode] = {}
        self._local = threading.local()
        self._ids = itertools.count()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.workers, thread_name_prefix="fedbus-gpuworker", initializer=self._bind
        )

    def _bind(self) -> None:
        """A new worker thread: its device, its stream, its staging buffer."""
        device = self.devices[next(self._ids) % len(self.devices)]
        self._local.device = device
        self._local.stream = torch.cuda.Stream(device)
        self._local.staging = Staging()

    def open(self, job: JobCode) -> None:
        self.jobs[job.job_id] = job

    def submit(self, task: SiteTask) -> concurrent.futures.Future[TaskOutcome]:
        return self._executor.submit(self._run, self.jobs[task.job_id], task)

    def _run(self, job: JobCode, task: SiteTask) -> TaskOutcome:
        local = self._local
        return run_on_device(job, task, local.device, local.stream, local.staging, self.release_memory)

    def close(self) -> None:
        from fedbus.recipes.simtime.tasks import forget_job

        self._executor.shutdown(wait=True, cancel_futures=True)
        for job_id in self.jobs:
            forget_job(job_id)


def run_on_device(
    job: JobCode,
    task: SiteTask,
    device: torch.device,
    stream: torch.cuda.Stream | None,
    staging: Staging,
    release_memory: bool,
) -> TaskOutcome:
    """``tasks.run_task`` on ``device`` (on ``stream``, the current device set to it); never raises."""
    from fedbus.recipes.simtime.tasks import run_task

    if device.type != "cuda" or stream is None:
        return run_task(job, task)
    try:
        with torch.cuda.device(device), torch.cuda.stream(stream):
            outcome = run_task(job, task, device=device, staging=staging)
            stream.synchronize()  # the staging buffer is free again; the outcome is on the host already
        return outcome
    finally:
        if release_memory:
            torch.cuda.empty_cache()
