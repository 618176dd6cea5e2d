"""Simulated time for SimEnv (``SimEnv(..., clock="simulated")``): the real broker on a clock that jumps from
event to event, thousands of sites as records, their tasks trained by a worker pool.

``loop`` (the clock), ``wire`` (the broker's endpoint), ``host`` (the sites), ``pool`` (the worker pool
interface and the thread pool), ``gpu`` (workers on CUDA devices), ``process_pool`` (worker processes),
``ray_pool`` (Ray actors; imported on demand: Ray is an optional extra), ``tasks`` (running a script for one task),
``availability``, ``backend`` (SimEnv's backend).
"""

from fedbus.recipes.simtime.availability import Availability
from fedbus.recipes.simtime.gpu import GpuWorkerPool
from fedbus.recipes.simtime.pool import JobCode, SiteTask, TaskOutcome, ThreadWorkerPool, WorkerPool, task_seed
from fedbus.recipes.simtime.process_pool import ProcessWorkerPool
from fedbus.recipes.simtime.tasks import SiteContext

__all__ = [
    "Availability",
    "GpuWorkerPool",
    "JobCode",
    "ProcessWorkerPool",
    "SiteContext",
    "SiteTask",
    "TaskOutcome",
    "ThreadWorkerPool",
    "WorkerPool",
    "task_seed",
]
