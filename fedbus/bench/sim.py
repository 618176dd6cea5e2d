"""``fedbus bench sim``: the simulated-time SimEnv at 1,000 and 10,000 sites (``SimEnv(clock="simulated")``).

For each number of sites a FedBuff job (``buffer`` K, ``concurrency`` tasks in flight) runs ``updates`` updates of
a random model of ``size_kb`` on the real broker, the sites being records on the site host and the training a
cheap function-form step (the model plus a constant) on ``workers`` worker threads, or (``pool``) on ``workers``
Ray actors of a local Ray instance started for the bench: ``ray`` passes each version's model to the actors through
Ray's object store (put once, read in place), ``ray-inline`` as every task's argument (serialised per task).

Figures (the last line, JSON), per number of sites:
* ``overhead_ms_per_update``: (wall seconds of the job, from its submission to its end, minus the workers'
  compute seconds) / updates: what the simulator (broker, site host, clock) costs per update;
* ``updates_per_s``: updates / wall seconds of the job;
* ``loop_cpu_ms_per_update``: CPU seconds of the simulation's event loop thread (broker, site host, clock: every
  update goes through it, so it bounds the rate) per update, start-up included: the figure least disturbed by
  other processes on the cores;
* ``cpu_ms_per_update``: this process's CPU seconds over the whole run (start-up and the trivial training
  included), per update: the figure to read where other processes share the cores (wall time then says little);
* ``startup_s``: starting the broker and registering every site (hello, welcome) before the job;
* ``rss_mb_over_model``: this process's peak RSS growth over the run, minus the model's size, in MiB.
"""

from __future__ import annotations

import io
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

from fedbus.bench.common import format_report, model_bytes, peak_rss, random_state_dict, reset_peak_rss, rss

POOLS = ("threads", "ray", "ray-inline")

SCRIPT = """
import fedbus.client as flare

def run_task(site, model):
    return flare.FLModel(params={k: v + 0.001 for k, v in model.params.items()}, meta={"NUM_STEPS_CURRENT_ROUND": 1})
"""


class _ThreadCpu:
    """Follows the CPU time of the thread named ``name`` (the recipe's event loop, started inside ``execute``)
    from a watcher thread polling every ``every`` seconds: its last reading before the thread ended."""

    def __init__(self, name: str, every: float = 0.02) -> None:
        self.name, self.every = name, every
        self.seconds = 0.0
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="fedbus-bench-cpu", daemon=True)

    def __enter__(self) -> _ThreadCpu:
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._watcher.join()

    def _watch(self) -> None:
        clock: int | None = None
        while not self._stop.wait(self.every):
            if clock is None:
                found = [t for t in threading.enumerate() if t.name == self.name and t.ident is not None]
                if not found:
                    continue
                clock = time.pthread_getcpuclockid(found[0].ident)  # type: ignore[arg-type]
            try:
                self.seconds = time.clock_gettime(clock)
            except OSError:  # the thread ended: keep its last reading
                return


def run_sim(
    sites: tuple[int, ...] = (1000, 10000),
    size_kb: float = 100,
    updates: int = 2000,
    workers: int = 2,
    buffer: int = 10,
    concurrency: int = 100,
    pool: str = "threads",
) -> str:
    from fedbus.recipes import FedBuffRecipe, SimEnv, SpeedProfile

    rows: list[tuple[str, Any]] = []
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    result: dict[str, Any] = {"size_kb": size_kb, "updates": updates, "workers": workers, "pool": pool}
    model = random_state_dict(size_kb / 1024)
    mb = model_bytes(model) / (1 << 20)
    with tempfile.TemporaryDirectory(prefix="fedbus-bench-sim-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        (src / "train.py").write_text(SCRIPT)
        for n in sites:
            reset_peak_rss()
            base = rss()
            recipe = FedBuffRecipe(
                f"bench{n}",
                model,
                src / "train.py",
                buffer_size=buffer,
                concurrency=concurrency,
                num_versions=max(1, updates // buffer),
            )
            workers_pool = _pool(pool, workers)
            env = SimEnv(
                n,
                pool=workers_pool,
                num_threads=workers,
                clock="simulated",
                workspace=Path(tmp) / f"ws{n}",
                progress=False,
                speed=SpeedProfile.lognormal(1.0, seed=0),
                train_s=60.0,
                log_config="warning",
            )
            started, cpu = time.monotonic(), time.process_time()
            try:
                with _ThreadCpu(f"fedbus-bench{n}") as loop_cpu:
                    run = recipe.execute(env)
            finally:
                if workers_pool is not None:
                    workers_pool.close()
            cpu = time.process_time() - cpu
            wall = time.monotonic() - started - run.timing.get("startup_s", 0.0)
            done = sum(1 for u in run.updates if u.get("accepted"))
            compute = sum(float(t.get("train_s", 0.0)) for t in run.tasks)
            figures = {
                "status": run.status,
                "updates": done,
                "overhead_ms_per_update": round(1000 * (wall - compute) / max(1, done), 3),
                "updates_per_s": round(done / wall, 1) if wall > 0 else None,
                "cpu_ms_per_update": round(1000 * cpu / max(1, done), 3),
                "loop_cpu_ms_per_update": round(1000 * loop_cpu.seconds / max(1, done), 3),
                "startup_s": run.timing.get("startup_s"),
                "sim_hours": round(run.history[-1].get("sim_time", 0.0) / 3600, 2) if run.history else 0.0,
                "rss_mb_over_model": round((peak_rss() - base) / (1 << 20) - mb, 1),
            }
            result[str(n)] = figures
            rows += [(f"{n} sites: {k}", v) for k, v in figures.items()]
    return format_report(rows, result)


def _pool(pool: str, workers: int) -> Any:
    """The bench's worker pool: None (SimEnv's threads), or Ray actors on a local instance, started and ready."""
    if pool == "threads":
        return None
    from fedbus.recipes.simtime.ray_pool import RayPool

    ray_pool = RayPool(None, workers, num_cpus=1, models="inline" if pool == "ray-inline" else "object_store")
    ray_pool.wait_ready()
    return ray_pool


def gpu_transfer(size_mb: float = 256, tensors: int = 64, repeat: int = 5) -> str:
    """A model's trip from the bus (safetensors bytes) to a GPU worker and back, two ways, best of ``repeat``:
    ``simtime.gpu`` (one copy into a page-locked staging buffer, one asynchronous transfer of the whole file,
    tensors as views; back: one page-locked buffer, a copy per tensor, one synchronisation) against the plain way
    (``serde.load_bytes`` then ``.to(device)`` per tensor; back: ``.cpu()`` per tensor). Needs CUDA."""
    import torch

    from fedbus.modelio import serde
    from fedbus.recipes.simtime.gpu import Staging, load_model, to_host

    device = torch.device("cuda", 0)
    per = int(size_mb * (1 << 20) / 4 / tensors)
    data = serde.save_bytes({f"t{i}": torch.randn(per) for i in range(tensors)})
    staging = Staging()

    def best(fn: Any) -> float:
        times = []
        for _ in range(repeat):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times)

    on_gpu = load_model(data, device, staging)
    figures: dict[str, Any] = {
        "model_mb": round(len(data) / (1 << 20), 1),
        "down_pinned_s": best(lambda: load_model(data, device, staging)),
        "down_plain_s": best(lambda: {k: v.to(device) for k, v in serde.load_bytes(data).items()}),
        "up_pinned_s": best(lambda: to_host(on_gpu)),
        "up_plain_s": best(lambda: {k: v.cpu() for k, v in on_gpu.items()}),
        "device": torch.cuda.get_device_name(device),
    }
    for key in [k for k in figures if k.endswith("_s")]:
        figures[key] = round(float(figures[key]), 4)
        figures[key.replace("_s", "_gb_per_s")] = round(len(data) / float(figures[key]) / 1e9, 2)
    return format_report(list(figures.items()), figures)


EVALUATE = """
import fedbus.client as flare

def run_task(site, model):
    return flare.FLModel(metrics={"n": float(sum(v.numel() for v in model.params.values()))})
"""


JOB_TOML = """
name = "transfer"
model = "model.safetensors"
[strategy]
name = "fedavg"
min_clients = 1
num_rounds = 1
[script]
path = "eval.py"
"""


def ray_transfer(size_mb: float = 32, tasks: int = 64, workers: int = 2, versions: int = 4) -> str:
    """How a model best reaches Ray actors: ``tasks`` evaluation tasks (the model down, a metric back) of a random
    model of ``size_mb``, over ``versions`` distinct models, on ``workers`` actors of a local Ray instance, with the
    model in the object store once per version (``object_store``) or as every task's argument (``inline``).
    Figures per mode: wall ms per task, and this process's CPU ms per task (the site host's share, the figure to
    read on a loaded machine). Needs Ray."""
    from fedbus.modelio import serde
    from fedbus.recipes.simtime.pool import JobCode, SiteTask
    from fedbus.recipes.simtime.ray_pool import RayPool

    rows: list[tuple[str, Any]] = []
    result: dict[str, Any] = {"size_mb": size_mb, "tasks": tasks, "workers": workers, "versions": versions}
    models = [serde.save_bytes(random_state_dict(size_mb)) for _ in range(versions)]
    with tempfile.TemporaryDirectory(prefix="fedbus-bench-ray-") as tmp:
        folder = Path(tmp)
        (folder / "eval.py").write_text(EVALUATE)
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("eval.py", EVALUATE)
            z.writestr("job.toml", JOB_TOML)
        job = JobCode("transfer", folder, "eval.py", (), workers, archive.getvalue())
        for mode in ("object_store", "inline"):
            pool = RayPool(None, workers, num_cpus=1, models=mode)
            try:
                pool.wait_ready()
                pool.open(job)
                started, cpu = time.monotonic(), time.process_time()
                futures = [
                    pool.submit(
                        SiteTask(
                            "transfer",
                            f"t{i}",
                            f"s{i}",
                            i,
                            "evaluate",
                            i % versions,
                            0,
                            1,
                            models[i % versions],
                            None,
                            {},
                            seed=i,
                        )
                    )
                    for i in range(tasks)
                ]
                errors = [f.result().error for f in futures]
                wall, cpu = time.monotonic() - started, time.process_time() - cpu
            finally:
                pool.close()
            figures = {
                "errors": sum(e is not None for e in errors),
                "wall_ms_per_task": round(1000 * wall / tasks, 2),
                "cpu_ms_per_task": round(1000 * cpu / tasks, 2),
            }
            result[mode] = figures
            rows += [(f"{mode}: {k}", v) for k, v in figures.items()]
    return format_report(rows, result)
