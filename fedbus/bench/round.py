"""``fedbus bench round``: whole federated rounds on real daemons, training replaced by a cheap update.

A broker and N site daemons run as separate processes over tcp loopback; the job's script receives the
global model, adds a constant in place and sends it back, so what is measured is the runtime: task
dispatch, model streams down and up, validation, streaming aggregation and checkpoints. Memory is read
from /proc of the broker process: peak RSS (VmHWM) growth over its RSS before the job, as a multiple of
the model size. The raw ZeroMQ ceiling for the same bytes is measured in the same run.
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
import time
from pathlib import Path
from typing import Any

from fedbus import serde
from fedbus.bench.common import format_report, model_bytes, random_state_dict

CLIENT = """
import torch
import fedbus.client as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    params = {k: (t.add_(0.001) if t.is_floating_point() else t) for k, t in model.params.items()}
    flare.send(flare.FLModel(params=params, params_type=model.params_type, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""


def _proc_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
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


def _daemon(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    level = "info" if args[0] == "broker" else "warning"
    return subprocess.Popen(
        [sys.executable, "-m", "fedbus.cli", *args, "--log-json", "--log-level", level],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
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
            await asyncio.sleep(0.05)
        else:
            raise TimeoutError(f"job did not finish within {timeout} s")
        data = await admin.request("download", {"job_id": job_id})
        return {"state": job["state"], "reason": job["reason"], "history": data["history"], "updates": data["updates"]}


def run_round(size_mb: float, sites: int, rounds: int = 3, strategy: str = "fedavg", timeout: float = 600.0) -> str:
    """Run the benchmark and return the report (a table, then one JSON line)."""
    from fedbus.bench.transfer import raw_zmq_gbps

    tmp = Path(tempfile.mkdtemp(prefix="fedbus-bench-round-"))
    procs: list[subprocess.Popen] = []
    try:
        size = _write_job(tmp / "job", size_mb, sites, rounds, strategy)
        sock = tmp / "broker.sock"
        address = f"ipc://{sock}" if os.environ.get("FEDBUS_BENCH_IPC") else _free_tcp()
        broker = _daemon(["broker", "--bind", address, "--workspace", str(tmp / "broker")], tmp / "broker.log")
        procs.append(broker)
        for i in range(sites):
            procs.append(
                _daemon(
                    ["site", "--name", f"s{i}", "--broker", address, "--workspace", str(tmp / f"s{i}")],
                    tmp / f"s{i}.log",
                )
            )
        _wait_listening(tmp / "broker.log", broker)
        base_rss = _proc_kb(broker.pid, "VmRSS")
        started = time.monotonic()
        result = asyncio.run(_run_job(address, tmp / "job", timeout))
        wall = time.monotonic() - started
        peak = _proc_kb(broker.pid, "VmHWM")
        tree_peak = sum(_proc_kb(p.pid, "VmHWM") for p in procs if p.poll() is None)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if result["state"] != "finished":
        raise RuntimeError(f"bench job {result['state']}: {result['reason']} (logs in {tmp})")
    times = [h["time"] for h in result["history"]]
    per_round = [b - a for a, b in itertools.pairwise(times)]
    round_s = statistics.median(per_round)
    bytes_per_round = 2 * sites * size
    raw = raw_zmq_gbps(bytes_per_round)
    gbps = bytes_per_round / round_s / 1e9
    out = {
        "size_mb": size_mb,
        "sites": sites,
        "rounds": rounds,
        "strategy": strategy,
        "round_s": round(round_s, 4),
        "round_s_all": [round(x, 4) for x in per_round],
        "bytes_per_round": bytes_per_round,
        "gbps": round(gbps, 3),
        "raw_zmq_gbps": round(raw, 3),
        "efficiency": round(gbps / raw, 3),
        "broker_rss_x": round((peak - base_rss) / size, 3),
        "total_rss_x": round(tree_peak / size, 3),
        "wall_s": round(wall, 2),
        "accepted": sum(1 for u in result["updates"] if u["accepted"]),
    }
    shutil.rmtree(tmp, ignore_errors=True)
    rows = [
        ("model / sites", f"{size_mb} MiB x {sites} sites, {rounds} rounds of {strategy}"),
        ("round", f"median {round_s:.3f} s ({', '.join(f'{x:.3f}' for x in per_round)})"),
        ("throughput", f"{gbps:.2f} GB/s of model traffic; raw zmq {raw:.2f} GB/s; efficiency {gbps / raw:.0%}"),
        ("broker rss", f"peak growth {out['broker_rss_x']:.2f} x model"),
    ]
    return format_report(rows, out)


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
