"""``fedbus bench sim``: the simulated-time SimEnv at 1,000 and 10,000 sites (``SimEnv(clock="simulated")``).

For each number of sites a FedBuff job (``buffer`` K, ``concurrency`` tasks in flight) runs ``updates`` updates of
a random model of ``size_kb`` on the real broker, the sites being records on the site host and the training a
cheap function-form step (the model plus a constant) on ``workers`` worker threads.

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

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedbus.bench.common import format_report, model_bytes, peak_rss, random_state_dict, reset_peak_rss, rss

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
) -> str:
    from fedbus.recipes import FedBuffRecipe, SimEnv, SpeedProfile

    rows: list[tuple[str, Any]] = []
    result: dict[str, Any] = {"size_kb": size_kb, "updates": updates, "workers": workers}
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
            env = SimEnv(
                n,
                num_threads=workers,
                clock="simulated",
                workspace=Path(tmp) / f"ws{n}",
                progress=False,
                speed=SpeedProfile.lognormal(1.0, seed=0),
                train_s=60.0,
                log_config="warning",
            )
            started, cpu = time.monotonic(), time.process_time()
            with _ThreadCpu(f"fedbus-bench{n}") as loop_cpu:
                run = recipe.execute(env)
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
