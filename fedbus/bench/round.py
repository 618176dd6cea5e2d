"""``fedbus bench round``: whole federated rounds on real daemons, training replaced by a cheap update.

A broker and N site daemons run as separate processes over tcp loopback; the job's script receives the
global model, adds a constant in place and sends it back, so what is measured is the runtime: task
dispatch, model streams down and up, the site <-> script hand-over, validation, streaming aggregation and
checkpoints. FedAvg: one version per round of N updates; FedBuff (concurrency = buffer = N): one version
per N updates, so ``round_s`` is seconds per global version either way.

Figures (the last line, JSON):
* ``round_s``: median seconds per version (between the times versions were published, the history's times)
  over every round but the first (the first also pays the
  scripts' start: a Python process importing torch, which is not the runtime's cost); ``first_round_s``
  is that first round on its own.
* ``bytes_per_round`` = 2 x N x model bytes (down and up); ``gbps`` = that / ``round_s``;
  ``raw_zmq_gbps`` = the bus's ceiling for the same bytes, measured in the same run by
  ``fedbus.bench.transfer.raw_zmq_gbps``; ``efficiency`` = ``gbps / raw_zmq_gbps``.
* ``broker_rss_x``: the broker's peak RSS (VmHWM) growth over its RSS once listening, in model sizes.
* ``total_rss_x``: the same for the whole process tree (broker, sites and their training scripts; the sum
  of each process's peak), over the baselines: the daemons' RSS once started, and for each script the RSS
  of an idle script process (``import torch, fedbus.client``) measured in the same run.
* ``omp_threads``: the OpenMP threads each process was given (``OMP_NUM_THREADS``): the sites split the cores,
  the broker, standing for a server with a machine of its own, has half of them.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from fedbus.bench.common import format_report, model_bytes, random_state_dict, thread_cpu
from fedbus.errors import ConfigError
from fedbus.modelio import serde

CLIENT = """
import torch
import fedbus.client as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    params = {k: (t.add_(0.001) if t.is_floating_point() else t) for k, t in model.params.items()}
    flare.send(flare.FLModel(params=params, params_type=model.params_type, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""


POLL_S = 0.25
"""How often the bench asks the broker whether its job has ended."""


def _proc_kb(pid: int, key: str) -> int:
    """A /proc/PID/status size field in bytes (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _write_job(folder: Path, size_mb: float, sites: int, rounds: int, strategy: str) -> int:
    folder.mkdir(parents=True)
    (folder / "client.py").write_text(CLIENT)
    model = random_state_dict(size_mb, seed=0)
    serde.write_file(folder / "model.safetensors", serde.layout(model))
    if strategy == "fedavg":
        strat = f'name = "fedavg"\nmin_clients = {sites}\nnum_rounds = {rounds}\n'
    else:
        strat = f'name = "fedbuff"\nconcurrency = {sites}\nbuffer_size = {sites}\nnum_versions = {rounds}\n'
    (folder / "job.toml").write_text(
        f'name = "bench"\nmodel = "model.safetensors"\n\n[strategy]\n{strat}\n'
        f'[script]\npath = "client.py"\nargs = []\n\n[sites]\nmin = {sites}\nmax = {sites}\n'
    )
    return model_bytes(model)


def _daemon(args: list[str], log: Path, threads: int, level: str) -> subprocess.Popen:
    # PocEnv's policy for processes sharing a machine: OpenMP threads split the cores (recipes/poc.py).
    # Without it, torch's idle OpenMP threads spin: a third of the broker's CPU on 2 cores (perf, 64 MiB x 4).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as err:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "fedbus.cli", *args, "--log-json", "--log-level", level],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )


async def _run_job(address: str, folder: Path, timeout: float) -> dict[str, Any]:
    from fedbus.admin import Admin

    async with Admin(address) as admin:
        job_id = await admin.submit(folder)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = (await admin.status(job_id))["jobs"][0]
            if job["state"] in ("finished", "failed", "aborted"):
                break
            # Figures come from the job's history, not from this poll: a slow poll only ends the run later,
            # while a fast one is load on the broker being measured (at 20/s, 1.6 % of the broker's samples
            # in a py-spy profile of the scale bench, whose status replies list 1,000 sites; too small to
            # show in its updates/s, which vary +-5 % from run to run).
            await asyncio.sleep(POLL_S)
        else:
            raise TimeoutError(f"job did not finish within {timeout} s")
        data = await admin.request("download", {"job_id": job_id})
        return {"state": job["state"], "reason": job["reason"], "history": data["history"], "updates": data["updates"]}


def run_round(
    size_mb: float,
    sites: int,
    rounds: int = 4,
    strategy: str = "fedavg",
    timeout: float = 600.0,
    logs: Path | None = None,
    broker_config: Path | None = None,
) -> str:
    """Run the benchmark and return the report (a table, then one JSON line). ``logs``: a folder to copy
    the daemons' logs into (debug level: a timeline of every stream and decision); ``broker_config``: the
    broker's profile (TOML)."""
    from fedbus.bench.transfer import raw_zmq_gbps

    if rounds < 2:
        raise ConfigError("--rounds must be >= 2: the first round also pays the scripts' start")
    tmp = Path(tempfile.mkdtemp(prefix="fedbus-bench-round-"))
    procs: list[subprocess.Popen] = []
    peaks = _Tree()
    try:
        size = _write_job(tmp / "job", size_mb, sites, rounds, strategy)
        floor = subprocess.Popen([sys.executable, "-c", SCRIPT_FLOOR], stdout=subprocess.PIPE, text=True)
        sock = tmp / "broker.sock"
        address = f"ipc://{sock}" if os.environ.get("FEDBUS_BENCH_IPC") else _free_tcp()
        cores = os.cpu_count() or 1
        threads = max(1, cores // (sites + 1))
        # The broker stands for a server with a machine of its own: half the cores for its folds, which run when
        # the sites wait (its idle OpenMP threads sleep: cli.py). S = 512, N = 4, 16 cores, same machine,
        # interleaved: 8 threads 1.37, 1.44, 1.33 s a round, 3 (the sites' share) 2.06, 1.50 (docs/benchmarks.md).
        broker_omp = max(threads, cores // 2)
        level = "debug" if logs else "warning"
        config = ["--config", str(broker_config)] if broker_config else []
        broker = _daemon(
            ["broker", "--bind", address, "--workspace", str(tmp / "broker"), *config],
            tmp / "broker.log",
            broker_omp,
            "debug" if logs else "info",
        )
        procs.append(broker)
        for i in range(sites):
            procs.append(
                _daemon(
                    ["site", "--name", f"s{i}", "--broker", address, "--workspace", str(tmp / f"s{i}")],
                    tmp / f"s{i}.log",
                    threads,
                    level,
                )
            )
        _wait_listening(tmp / "broker.log", broker)
        script_floor = int((floor.communicate(timeout=120)[0] or "0").strip() or 0)
        base_rss = _proc_kb(broker.pid, "VmRSS")
        started = time.monotonic()
        peaks.start({p.pid: "broker" if p is broker else "sites" for p in procs})
        result = asyncio.run(_run_job(address, tmp / "job", timeout))
        wall = time.monotonic() - started
        peaks.stop()
        broker_peak = _proc_kb(broker.pid, "VmHWM")
    finally:
        peaks.stop()
        stop_all(procs)
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            for log in tmp.glob("*.log"):
                shutil.copy(log, logs / log.name)
    if result["state"] != "finished":
        raise RuntimeError(f"bench job {result['state']}: {result['reason']} (logs in {tmp})")
    times = [h["time"] for h in result["history"]]
    per_round = [b - a for a, b in itertools.pairwise(times)]
    round_s = statistics.median(per_round[1:])
    bytes_per_round = 2 * sites * size
    raw = raw_zmq_gbps(bytes_per_round)
    gbps = bytes_per_round / round_s / 1e9
    scripts = len(peaks.peak) - len(procs)
    tree_growth = sum(peaks.peak.values()) - sum(peaks.base.values()) - scripts * script_floor
    cpu = peaks.cpu_between(times[1], times[-1])
    cpu_all = {k: round(v / (len(times) - 2), 3) for k, v in sorted(cpu.items())}
    cpu_per_round = {k: v for k, v in cpu_all.items() if ":" not in k}
    broker_threads = {k.removeprefix("broker:"): v for k, v in cpu_all.items() if k.startswith("broker:")}
    out = {
        "size_mb": size_mb,
        "sites": sites,
        "rounds": rounds,
        "strategy": strategy,
        "round_s": round(round_s, 4),
        "first_round_s": round(per_round[0], 4),
        "round_s_all": [round(x, 4) for x in per_round],
        "bytes_per_round": bytes_per_round,
        "gbps": round(gbps, 3),
        "raw_zmq_gbps": round(raw, 3),
        "efficiency": round(gbps / raw, 3),
        "broker_rss_x": round((broker_peak - base_rss) / size, 3),
        "total_rss_x": round(tree_growth / size, 3),
        "processes": len(peaks.peak),
        "omp_threads": {"broker": broker_omp, "sites": threads},
        "cpu_s_per_round": cpu_per_round,
        "broker_cpu_s_per_round": broker_threads,
        "wall_s": round(wall, 2),
        "accepted": sum(1 for u in result["updates"] if u["accepted"]),
    }
    shutil.rmtree(tmp, ignore_errors=True)
    rows = [
        ("model / sites", f"{size_mb} MiB x {sites} sites, {rounds} versions of {strategy}"),
        ("round", f"median {round_s:.3f} s after the first ({', '.join(f'{x:.3f}' for x in per_round)})"),
        ("throughput", f"{gbps:.2f} GB/s of model traffic; raw zmq {raw:.2f} GB/s; efficiency {gbps / raw:.0%}"),
        ("broker rss", f"peak growth {out['broker_rss_x']:.2f} x model"),
        ("process tree", f"peak growth {out['total_rss_x']:.2f} x model over {len(peaks.peak)} processes"),
        ("cpu per round", ", ".join(f"{k} {v:.2f} s" for k, v in cpu_per_round.items())),
        ("broker threads", ", ".join(f"{k} {v:.2f} s" for k, v in broker_threads.items())),
    ]
    return format_report(rows, out)


SCRIPT_FLOOR = "import torch, fedbus.client, psutil; print(psutil.Process().memory_info().rss)"
"""An idle training script: what every script process costs before it holds a model."""


class _Tree:
    """Peak RSS (VmHWM) and CPU time of the daemons and every process they start, sampled in a thread.

    VmHWM only grows, so reading it every 0.1 s loses at most the last 0.1 s of a process that exits;
    CPU samples are kept with their wall-clock time, so CPU seconds per round can be cut out between two
    version timestamps. This runs in the harness, never on the round path.
    """

    def __init__(self) -> None:
        self.peak: dict[int, int] = {}
        self.base: dict[int, int] = {}
        self.kind: dict[int, str] = {}
        self.cpu: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._procs: dict[int, psutil.Process] = {}
        self._roots: list[int] = []

    def start(self, roots: dict[int, str]) -> None:
        self.base = {pid: _proc_kb(pid, "VmRSS") for pid in roots}
        self.kind = dict(roots)
        self._roots = list(roots)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(0.1):
                self._sample()
                return

    def _sample(self) -> None:
        totals: dict[str, float] = {}
        for pid in self._roots:
            try:
                kids = psutil.Process(pid).children(recursive=True)
            except psutil.Error:
                kids = []
            for kid in kids:
                self.kind.setdefault(kid.pid, "scripts")
            for p in (pid, *(k.pid for k in kids)):
                hwm = _proc_kb(p, "VmHWM")
                if hwm:
                    self.peak[p] = max(self.peak.get(p, 0), hwm)
                try:
                    t = self._procs.setdefault(p, psutil.Process(p)).cpu_times()
                except psutil.Error:
                    continue
                totals[self.kind[p]] = totals.get(self.kind[p], 0.0) + t.user + t.system
                if self.kind[p] == "broker":  # which of its threads: the loop, zmq's I/O, or the workers
                    for part, seconds in thread_cpu(p).items():
                        totals[f"broker:{part}"] = seconds
        self.cpu.append((time.time(), totals))

    def cpu_between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds each kind of process used between wall-clock times t0 and t1 (nearest samples)."""
        if not self.cpu:
            return {}
        a = min(self.cpu, key=lambda s: abs(s[0] - t0))[1]
        b = min(self.cpu, key=lambda s: abs(s[0] - t1))[1]
        return {k: b[k] - a.get(k, 0.0) for k in b}

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def stop_all(procs: list[subprocess.Popen], grace: float = 15.0) -> None:
    """SIGTERM every process still running, then wait; SIGKILL what outlives ``grace``; close our pipe ends."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.stdout is not None:
            p.stdout.close()


def _wait_listening(log: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """The broker's baseline memory is read once it is ready, after its imports."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if "broker listening" in log.read_text():
            return
        time.sleep(0.05)
    raise RuntimeError(f"the broker did not start: {log.read_text()[-2000:]}")


def _free_tcp() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"
