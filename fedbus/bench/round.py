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
* ``broker_rss_x``: the broker's peak RSS growth over its RSS once listening, in model sizes.
* ``total_rss_x``: the same summed over the whole process tree (broker, sites and their training scripts), each
  process over its own baseline: a daemon's RSS once the broker listens, a script's once it has imported torch
  and connected (the script reads both figures itself). Each process's peak (VmHWM) is reset when its baseline
  is taken, so a peak is the process's own from then on and never below its baseline. A script the job ended
  before it connected (FedBuff may finish on the sites that were ready first) held no model and adds nothing;
  an idle script measured in another process is no baseline for the others (their RSS differs by MiBs).
  ``processes`` counts the daemons and the training scripts.
* ``cpu_s_per_round``: CPU seconds per version of the broker, the sites and the scripts (every process of a kind
  together); ``cpu_s_per_round_threads`` splits each kind by thread (``main`` the event loop, ``zmq_io`` libzmq's
  I/O threads, ``other`` placement, fold and OpenMP threads); ``broker_cpu_s_per_round`` is the broker's split.
* ``cpu_s_per_gib``: the same over the GiB of model moved per version (``bytes_per_round``): ``total`` for the whole
  tree, each kind, ``threads`` by kind and thread, and ``raw_zmq``: raw ZeroMQ's sender and receiver CPU per GiB in
  the ceiling run, the cost of a byte's trip through the kernel and libzmq alone.
* ``omp_threads``: the OpenMP threads each process was given (``OMP_NUM_THREADS``): the sites split the cores,
  the broker, standing for a server with a machine of its own, has half of them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
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
import torch

from fedbus.bench.common import (
    LAYOUTS,
    GiB,
    format_report,
    llama_shapes,
    model_bytes,
    per_gib,
    random_state_dict,
    reset_peak_rss,
    thread_cpu,
    write_model_file,
)
from fedbus.errors import ConfigError
from fedbus.modelio import serde

MiB = 1 << 20

CLIENT = """
import json
import os
from pathlib import Path

import torch
import fedbus.client as flare
from fedbus.bench.common import peak_rss, reset_peak_rss, rss

def report(suffix, figures):
    path = Path(os.environ["FEDBUS_BENCH_MEMORY"], str(os.getpid()))
    path.with_suffix(".tmp").write_text(json.dumps(figures))
    path.with_suffix(".tmp").rename(path.with_suffix(suffix))


flare.init()
reset_peak_rss()  # the growth is this process's own from here: imported, connected, holding no model
base = rss()
report(".base", {"base": base})
while flare.is_running():
    model = flare.receive()
    params = {k: (t.add_(0.001) if t.is_floating_point() else t) for k, t in model.params.items()}
    flare.send(flare.FLModel(params=params, params_type=model.params_type, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
report(".json", {"base": base, "peak": peak_rss()})
"""


MEMORY_VAR = "FEDBUS_BENCH_MEMORY"
"""The folder each training script writes its memory figures to: ``PID.base`` once connected (its baseline RSS),
``PID.json`` as it ends (its baseline and peak RSS)."""

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


RAW_CAP = 8 * GiB
"""Raw ZeroMQ's ceiling is measured on at most this many bytes (a rate: a 7B round's 100 GB would only take longer)."""
RAW_FLOOR = 256 * MiB
"""... and on at least this many: the process CPU clock ticks in 10 ms, and a few MiB cost less than a tick."""


def _raw_bytes(moved: int) -> int:
    """The bytes raw ZeroMQ's run moves for a round that moves ``moved``."""
    return min(max(moved, RAW_FLOOR), RAW_CAP)


def _write_job(
    folder: Path,
    size_mb: float,
    sites: int,
    rounds: int,
    strategy: str,
    layout: str = "blocks",
    dtype: str = "float32",
    layers: int = 32,
    he: bool = False,
    strategy_extra: str = "",
) -> int:
    folder.mkdir(parents=True)
    (folder / "client.py").write_text(CLIENT)
    torch_dtype = getattr(torch, dtype)
    if layout == "llama-7b":  # generated into the file: no 13 GB copy in this process
        shapes = llama_shapes(layers=layers, dtype=torch_dtype)
        write_model_file(folder / "model.safetensors", shapes)
        size = sum(math.prod(shape) * torch_dtype.itemsize for _, shape in shapes.values())
    elif layout == "blocks":
        model = random_state_dict(size_mb, seed=0, dtype=torch_dtype)
        serde.write_file(folder / "model.safetensors", serde.layout(model))
        size = model_bytes(model)
        del model
    else:
        raise ConfigError(f"--layout {layout!r}: one of {', '.join(LAYOUTS)}")
    if strategy == "fedavg":
        strat = f'name = "fedavg"\nmin_clients = {sites}\nnum_rounds = {rounds}\n'
    else:
        strat = f'name = "fedbuff"\nconcurrency = {sites}\nbuffer_size = {sites}\nnum_versions = {rounds}\n'
    strat += strategy_extra
    (folder / "job.toml").write_text(
        f'name = "bench"\nmodel = "model.safetensors"\n\n[strategy]\n{strat}\n'
        f'[script]\npath = "client.py"\nargs = []\n\n[sites]\nmin = {sites}\nmax = {sites}\n'
        + ("\n[extra.privacy]\nhe = true\n" if he else "")
    )
    return size


def _he_configs(tmp: Path, broker_config: Path | None) -> tuple[Path, Path]:
    """A fresh CKKS context (fedbus.he defaults) for an encrypted run: the broker's profile with its keyless part
    (``broker_config``'s keys kept) and a site config with the secret one. (broker TOML, site TOML)"""
    from fedbus.config import read_toml
    from fedbus.he.context import BROKER_FILE, SITE_FILE, broker_bytes, new_site_context, site_bytes, write_private
    from fedbus.toml_writer import dumps_toml

    ctx = new_site_context()
    (tmp / "he-broker").mkdir()
    (tmp / "he-site").mkdir()
    (tmp / "he-broker" / BROKER_FILE).write_bytes(broker_bytes(ctx))
    write_private(tmp / "he-site" / SITE_FILE, site_bytes(ctx))
    profile = dict(read_toml(broker_config)) if broker_config is not None else {}
    profile["he_context"] = str(tmp / "he-broker" / BROKER_FILE)
    (tmp / "broker.toml").write_text(dumps_toml(profile))
    (tmp / "site.toml").write_text(dumps_toml({"he_context": str(tmp / "he-site" / SITE_FILE)}))
    return tmp / "broker.toml", tmp / "site.toml"


def _curve_configs(
    tmp: Path, sites: int, address: str, broker_config: Path | None, he: bool
) -> tuple[Path, list[Path], Path]:
    """Kits from ``fedbus provision`` for a run over CURVE (and, with ``he``, the project's CKKS context): the
    broker's profile (``broker_config``'s keys over the kit's), each site's config, the admin kit."""
    from fedbus.config import read_toml
    from fedbus.provision import provision
    from fedbus.toml_writer import dumps_toml

    names = [f"s{i}" for i in range(sites)]
    participants = "".join(f'\n[[participant]]\nname = "{n}"\nrole = "site"\n' for n in names)
    project = tmp / "project.toml"
    project.write_text(
        f'name = "bench"\nbroker = "{address}"\n'
        + ("he = true\n" if he else "")
        + participants
        + '\n[[participant]]\nname = "bench"\nrole = "admin"\n'
    )
    kits = tmp / "kits"
    provision(project, kits)
    profile_path = kits / "broker" / "broker.toml"
    if broker_config is not None:  # written beside the kit's own: its paths are relative to that folder
        profile = {**read_toml(profile_path), **read_toml(broker_config)}
        profile_path = kits / "broker" / "bench.toml"
        profile_path.write_text(dumps_toml(profile))
    return profile_path, [kits / n / "site.toml" for n in names], kits / "bench"


def _wire_bytes(workspace: Path, sites: int, accepted: int, versions: int) -> tuple[int, int]:
    """Bytes a version moves: (up, down). Up: the updates the broker received (its audit log's sizes), per version;
    down: the newest checkpoint (what each site downloads) once per site."""
    sizes = [
        r["size"]
        for r in map(json.loads, (workspace / "audit.jsonl").read_text().splitlines())
        if r.get("kind") == "update_received"
    ]
    up = sum(sizes) * min(1.0, accepted / max(len(sizes), 1)) / max(versions, 1)
    checkpoints = [p for p in workspace.rglob("*.safetensors") if "files" not in p.parts]
    down = max(checkpoints, key=lambda p: p.stat().st_mtime).stat().st_size * sites if checkpoints else 0
    return int(up), int(down)


def _daemon(
    args: list[str], log: Path, threads: int, level: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    # PocEnv's policy for processes sharing a machine: OpenMP threads split the cores (recipes/poc.py), since
    # torch's idle OpenMP threads otherwise spin on cores the other processes need.
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as err:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "fedbus.cli", *args, "--log-json", "--log-level", level],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )


async def _run_job(address: str, folder: Path, timeout: float, kit: Path | None = None) -> dict[str, Any]:
    from fedbus.admin import Admin, from_kit

    async with from_kit(kit) if kit is not None else Admin(address) as admin:
        job_id = await admin.submit(folder)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = (await admin.status(job_id))["jobs"][0]
            if job["state"] in ("finished", "failed", "aborted"):
                break
            # Figures come from the job's history, not from this poll: a slow poll only ends the run later,
            # while a fast one is load on the broker being measured.
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
    he: bool = False,
    strategy_extra: str = "",
    layout: str = "blocks",
    dtype: str = "float32",
    layers: int = 32,
    curve: bool = False,
) -> str:
    """Run the benchmark and return the report (a table, then one JSON line). ``logs``: a folder to copy
    the daemons' logs into (debug level: a timeline of every stream and decision); ``broker_config``: the
    broker's profile (TOML); ``he``: the same job run again with homomorphic encryption, both reported;
    ``strategy_extra``: more lines of the job's ``[strategy]`` table (secure aggregation: ``fedbus.bench.secagg``);
    ``layout``: the model's tensors (``LAYOUTS``; ``llama-7b`` ignores ``size_mb``; ``layers`` of it: 32 for 7B,
    fewer where the disk cannot hold the round's files), ``dtype`` theirs; ``curve``: over CURVE, keys provisioned."""
    shape: dict[str, Any] = {"layout": layout, "dtype": dtype, "layers": layers, "curve": curve}
    args = (size_mb, sites, rounds, strategy, timeout, logs, broker_config)
    if not he:
        return format_report(*measure_round(*args, strategy_extra=strategy_extra, **shape))
    plain_rows, plain = measure_round(*args, **shape)
    he_rows, enc = measure_round(*args, he=True, **shape)
    ratios = {
        "round_x": round(enc["round_s"] / plain["round_s"], 2),
        "wire_x": round(enc["wire_bytes_per_round"] / plain["wire_bytes_per_round"], 2),
        "broker_rss_x": round(enc["broker_rss_x"] / max(plain["broker_rss_x"], 1e-9), 2),
    }
    rows = [
        *[(f"plaintext {k}", v) for k, v in plain_rows],
        *[(f"he {k}", v) for k, v in he_rows],
        ("he / plaintext", ", ".join(f"{k} {v:g}" for k, v in ratios.items())),
    ]
    return format_report(rows, {"plaintext": plain, "he": enc, "he_over_plaintext": ratios})


def measure_round(
    size_mb: float,
    sites: int,
    rounds: int,
    strategy: str,
    timeout: float,
    logs: Path | None,
    broker_config: Path | None,
    he: bool = False,
    strategy_extra: str = "",
    layout: str = "blocks",
    dtype: str = "float32",
    layers: int = 32,
    curve: bool = False,
) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """One run of the benchmark (``he``: the job encrypted; ``strategy_extra``: lines of its ``[strategy]``;
    ``layout``, ``dtype``, ``layers``: the model, as ``run_round``'s; ``curve``: every connection over CURVE,
    keys from ``fedbus provision``): its report rows and figures."""
    from fedbus.bench.transfer import raw_zmq_run

    if rounds < 2:
        raise ConfigError("--rounds must be >= 2: the first round also pays the scripts' start")
    tmp = Path(tempfile.mkdtemp(prefix="fedbus-bench-round-"))
    procs: list[subprocess.Popen] = []
    peaks = _Tree()
    try:
        size = _write_job(tmp / "job", size_mb, sites, rounds, strategy, layout, dtype, layers, he, strategy_extra)
        sock = tmp / "broker.sock"
        address = f"ipc://{sock}" if os.environ.get("FEDBUS_BENCH_IPC") else _free_tcp()
        site_configs: list[list[str]] = [[] for _ in range(sites)]
        kit = None
        if curve:
            broker_config, site_tomls, kit = _curve_configs(tmp, sites, address, broker_config, he)
            site_configs = [["--config", str(t)] for t in site_tomls]
        elif he:
            broker_config, site_toml = _he_configs(tmp, broker_config)
            site_configs = [["--config", str(site_toml)]] * sites
        reports = tmp / "memory"
        reports.mkdir()
        cores = os.cpu_count() or 1
        threads = max(1, cores // (sites + 1))
        # The broker stands for a server with a machine of its own: half the cores for its folds, which run when
        # the sites wait (its idle OpenMP threads sleep: cli.py); docs/benchmarks.md has the figures.
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
                    [
                        "site",
                        "--name",
                        f"s{i}",
                        "--broker",
                        address,
                        "--workspace",
                        str(tmp / f"s{i}"),
                        *site_configs[i],
                    ],
                    tmp / f"s{i}.log",
                    threads,
                    level,
                    {MEMORY_VAR: str(reports)},  # the sites pass their environment on to the scripts
                )
            )
        _wait_listening(tmp / "broker.log", broker)
        started = time.monotonic()
        peaks.start({p.pid: "broker" if p is broker else "sites" for p in procs})
        result = asyncio.run(_run_job(address, tmp / "job", timeout, kit))
        wall = time.monotonic() - started
        peaks.stop()
        if result["state"] == "finished":
            peaks.add_reports(_script_reports(reports, timeout=60.0))
            accepted = sum(1 for u in result["updates"] if u["accepted"])
            up, down = _wire_bytes(tmp / "broker", sites, accepted, len(result["history"]) - 1)
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
    raw_run = raw_zmq_run(_raw_bytes(bytes_per_round))
    raw = raw_run.gbps
    gbps = bytes_per_round / round_s / 1e9
    growth = memory_growth(peaks.peak, peaks.base)
    cpu = peaks.cpu_between(times[1], times[-1])
    cpu_all = {k: round(v / (len(times) - 2), 3) for k, v in sorted(cpu.items())}
    cpu_per_round = {k: v for k, v in cpu_all.items() if ":" not in k}
    broker_threads = {k.removeprefix("broker:"): v for k, v in cpu_all.items() if k.startswith("broker:")}
    by_thread = {
        kind: {k.split(":")[1]: v for k, v in cpu_all.items() if k.startswith(kind + ":")} for kind in cpu_per_round
    }
    out = {
        "size_mb": round(size / (1 << 20), 1),
        "layout": layout,
        "dtype": dtype,
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
        "broker_rss_x": round(growth[broker.pid] / size, 3),
        "total_rss_x": round(sum(growth.values()) / size, 3),
        "processes": len(procs) + len(peaks.scripts | (peaks.peak.keys() - {p.pid for p in procs})),
        "omp_threads": {"broker": broker_omp, "sites": threads},
        "cpu_s_per_round": cpu_per_round,
        "broker_cpu_s_per_round": broker_threads,
        "cpu_s_per_round_threads": by_thread,
        "cpu_s_per_gib": _cpu_per_gib(cpu_per_round, by_thread, bytes_per_round, raw_run),
        "wall_s": round(wall, 2),
        "accepted": accepted,
        "he": he,
        "curve": curve,
        "up_bytes_per_round": up,
        "down_bytes_per_round": down,
        "wire_bytes_per_round": up + down,
    }
    shutil.rmtree(tmp, ignore_errors=True)
    rows = [
        (
            "model / sites",
            f"{out['size_mb']} MiB ({layout}, {dtype}) x {sites} sites, {rounds} versions of {strategy}"
            + (", over CURVE" if curve else ""),
        ),
        ("round", f"median {round_s:.3f} s after the first ({', '.join(f'{x:.3f}' for x in per_round)})"),
        ("throughput", f"{gbps:.2f} GB/s of model traffic; raw zmq {raw:.2f} GB/s; efficiency {gbps / raw:.0%}"),
        ("broker rss", f"peak growth {out['broker_rss_x']:.2f} x model"),
        ("process tree", f"peak growth {out['total_rss_x']:.2f} x model over {out['processes']} processes"),
        ("cpu per round", ", ".join(f"{k} {v:.2f} s" for k, v in cpu_per_round.items())),
        ("broker threads", ", ".join(f"{k} {v:.2f} s" for k, v in broker_threads.items())),
        ("wire", f"{(up + down) / MiB:.1f} MiB a version: {up / MiB:.1f} up, {down / MiB:.1f} down"),
        ("cpu s / GiB moved", _gib_row(out["cpu_s_per_gib"])),
    ]
    return rows, out


def _cpu_per_gib(kinds: dict[str, float], threads: dict[str, dict[str, float]], moved: int, raw: Any) -> dict[str, Any]:
    """CPU seconds per GiB of model moved (down and up): the whole tree's, each process kind's, each kind's by thread
    (``main`` the event loop, ``zmq_io`` libzmq's I/O threads, ``other`` placement, fold and OpenMP threads), and raw
    ZeroMQ's, sender and receiver together, in the same run: the floor a byte's trip through the kernel costs."""
    out = per_gib({"total": sum(kinds.values()), **kinds, "threads": threads}, moved)
    raw_gib = raw.send_cpu_s + raw.recv_cpu_s
    out["raw_zmq"] = round(raw_gib / (_raw_bytes(moved) / GiB), 3)
    return out


def _gib_row(figures: dict[str, Any]) -> str:
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in figures.items() if k not in ("total", "threads", "raw_zmq"))
    return f"{figures['total']:.2f} ({kinds}); raw zmq {figures['raw_zmq']:.2f}"


def memory_growth(peak: dict[int, int], base: dict[int, int]) -> dict[int, int]:
    """Each process's peak RSS growth over its own baseline, in bytes, by PID.

    Every process needs a baseline of its own, taken when its peak was reset: a peak below its baseline means
    the two were not read in that order, and no figure is better than a wrong one (RuntimeError).
    """
    if peak.keys() != base.keys():
        raise RuntimeError(f"processes without both a peak and a baseline: {sorted(peak.keys() ^ base.keys())}")
    below = {pid: (peak[pid], base[pid]) for pid in peak if peak[pid] < base[pid]}
    if below:
        raise RuntimeError(f"peak RSS below its baseline (peak, baseline) by PID: {below}")
    return {pid: peak[pid] - base[pid] for pid in peak}


def _script_reports(folder: Path, timeout: float) -> dict[int, tuple[int, int]]:
    """The memory reports of the training scripts that connected, by PID: (baseline, peak) RSS in bytes.

    Each script writes its report as it ends, once the job has ended. A script the job ended before it
    connected (FedBuff can finish on the updates of the sites that were ready first) held no model and
    has none."""
    connected = {int(f.stem) for f in folder.glob("*.base")}
    deadline = time.monotonic() + timeout
    while (missing := {pid for pid in connected if not (folder / f"{pid}.json").exists()}) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    if missing:
        raise RuntimeError(f"training scripts that connected but did not report their memory: {sorted(missing)}")
    reports = {pid: json.loads((folder / f"{pid}.json").read_text()) for pid in connected}
    return {pid: (r["base"], r["peak"]) for pid, r in reports.items()}


class _Tree:
    """Peak RSS (VmHWM) of the daemons and CPU time of every process they start, sampled in a thread.

    A daemon's peak is reset when its baseline is read, and its VmHWM only grows, so the last sample (taken at
    ``stop``, while the daemons still run) is its peak since the baseline. The training scripts measure their
    own memory (``add_reports``): they may end between two samples. CPU samples are kept with their wall-clock
    time, so CPU seconds per round can be cut out between two version timestamps. This runs in the harness,
    never on the round path.
    """

    def __init__(self) -> None:
        self.peak: dict[int, int] = {}
        self.base: dict[int, int] = {}
        self.kind: dict[int, str] = {}
        self.scripts: set[int] = set()
        """The training scripts seen running (a site's children running ``client.py``), connected or not."""
        self.cpu: list[tuple[float, dict[str, float]]] = []
        self._seen: dict[tuple[int, str], float] = {}  # (pid, kind or kind:thread) -> its last CPU seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._procs: dict[int, psutil.Process] = {}
        self._roots: list[int] = []

    def start(self, roots: dict[int, str]) -> None:
        for pid in roots:  # the peak first, then the baseline: the peak can only be at or above it
            reset_peak_rss(pid)
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
                self.kind.setdefault(kid.pid, "scripts")  # CPU: a script's own children count as the script's
                if kid.pid not in self.scripts and self.kind[pid] == "sites" and _runs_script(kid, pid):
                    self.scripts.add(kid.pid)
            hwm = _proc_kb(pid, "VmHWM")
            if hwm:
                self.peak[pid] = max(self.peak.get(pid, 0), hwm)
            for p in (pid, *(k.pid for k in kids)):
                try:
                    t = self._procs.setdefault(p, psutil.Process(p)).cpu_times()
                except psutil.Error:
                    continue
                kind = self.kind[p]
                self._seen[(p, kind)] = t.user + t.system
                for part, seconds in thread_cpu(p).items():  # which threads: the loop, zmq's I/O, or the others
                    self._seen[(p, f"{kind}:{part}")] = seconds
        # every process ever seen, at its last reading: one that exited (a script the job ended) keeps its CPU
        for (_, key), seconds in self._seen.items():
            totals[key] = totals.get(key, 0.0) + seconds
        self.cpu.append((time.time(), totals))

    def cpu_between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds each kind of process used between wall-clock times t0 and t1 (nearest samples)."""
        if not self.cpu:
            return {}
        a = min(self.cpu, key=lambda s: abs(s[0] - t0))[1]
        b = min(self.cpu, key=lambda s: abs(s[0] - t1))[1]
        return {k: b[k] - a.get(k, 0.0) for k in b}

    def add_reports(self, reports: dict[int, tuple[int, int]]) -> None:
        """Processes that measured their own memory: (baseline, peak) RSS in bytes by PID."""
        for pid, (base, peak) in reports.items():
            self.base[pid], self.peak[pid] = base, peak

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _runs_script(proc: psutil.Process, site: int) -> bool:
    """Whether ``proc`` is a training script a site started: not a helper process a site or script ran for a
    moment (a shell, ``ldconfig``), which is no process of the job's."""
    try:
        return proc.ppid() == site and any(arg.endswith("client.py") for arg in proc.cmdline())
    except psutil.Error:
        return False


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
