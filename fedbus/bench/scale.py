"""``fedbus bench scale``: many connected sites on one broker, FedBuff over a small model.

A real broker process; the sites are lightweight simulations, many per process (``--procs`` processes of
asyncio DEALER sockets), that speak the real protocol through the real transport: ``hello`` with the site
identity, ``heartbeat`` every ``heartbeat_s`` from the broker's ``welcome``, tasks received as model streams
into a ``BufferSink``, results sent as ``result`` plus a DIFF stream from a ``ModelSource``. Only the training
script is left out (a precomputed small delta answers every task at once), so what is measured is the
broker: how many updates per second it accepts, and how long it takes to answer a heartbeat meanwhile.

A model of one chunk or less travels inside its offer (the inline fast path, ``fedbus.protocol.stream``):
a task costs the broker ``task`` + ``offer``+bytes out and ``ack`` in, a result ``result`` + ``offer``+bytes
in and ``ack`` out.

Figures (last line, JSON): ``updates_per_s`` (accepted updates over the versions published after the first,
``buffer`` updates each); heartbeat round trips ``hb_p50_ms`` / ``hb_p99_ms`` over the same window, measured by
``PROBES`` idle sites in a process of their own (the broker's answer time under the load), and
``hb_loaded_*`` as the busy simulated sites see them (including their own event loop's backlog);
``broker_cpu`` (CPU seconds per second, all threads) and the broker's RSS.

The simulated sites run at a lower scheduling priority (``sim_nice``, default 10): they stand in for sites on
other machines, and on shared cores the kernel would otherwise preempt the broker's event loop for them many
times a second, so that the bench measured the simulators' share of the machine rather than the broker.
``--sim-nice 0`` measures the broker with equal shares. The probes keep the default priority.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import psutil

from fedbus.bench.common import format_report, random_state_dict
from fedbus.bench.round import _daemon, _free_tcp, _proc_kb, _run_job, _wait_listening, stop_all
from fedbus.errors import FedbusError
from fedbus.modelio import serde
from fedbus.modelio.sinks import BufferSink
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.liveness import heartbeat_due_in
from fedbus.protocol.messages import STREAM_TYPES, Deploy, EndJob, Heartbeat, Hello, Offer, Result, Task, Welcome
from fedbus.security import ClientKeys
from fedbus.transport.context import Context
from fedbus.transport.endpoint import DealerEndpoint
from fedbus.transport.streams import DEFAULT_CHUNK, StreamHub


class SimSite:
    """One simulated site on its own DEALER: hello, heartbeats, and an instant DIFF answer to every task.

    Heartbeats follow the site daemon's rule: one only after a period with no message either way."""

    def __init__(
        self,
        name: str,
        address: str,
        ctx: Context,
        delta: ModelSource,
        *,
        keys: ClientKeys | None = None,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        """``keys``: a CURVE site's (its routing id then carries its key's token); ``chunk``: its uploads' chunk."""
        self.name = name
        identity = b"site:" + name.encode() + (b":" + keys.routing_token().encode() if keys else b"")
        curve = keys.as_tuple() if keys else None
        self.ep = DealerEndpoint.connect(ctx, address, identity=identity, curve=curve)
        self.hub = StreamHub(self, on_offer=self._on_offer, chunk_size=chunk)
        self.delta = delta
        self.tasks: dict[int, Task] = {}
        self.rtts: list[tuple[float, float]] = []  # (wall time, round trip s)
        self._beats: deque[float] = deque()
        self.heartbeat_s = 1.0
        self.sent_at = self.heard_at = float("-inf")  # the loop's clock at the last message each way
        self.updates = 0
        self.ended = asyncio.Event()

    async def send(self, peer: bytes, msg: Any, payload: Any = ()) -> None:  # the hub's outbox
        await self.ep.send(b"", msg, payload)
        self.sent_at = asyncio.get_running_loop().time()

    async def run(self) -> None:
        await self.send(b"", Hello(role="site", name=self.name, session=secrets.token_hex(8), caps={"sim": True}))
        beats = asyncio.create_task(self._heartbeats())
        try:
            while not self.ended.is_set():
                inc = await self.ep.recv()
                self.heard_at = asyncio.get_running_loop().time()
                await self._on(inc.msg, inc.payload)
        finally:
            beats.cancel()
            await self.hub.close()

    async def _heartbeats(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.heartbeat_s * secrets.randbelow(1000) / 1000)  # spread the sites out
        while True:
            if heartbeat_due_in(self.sent_at, self.heard_at, self.heartbeat_s, loop.time()) <= 0:
                self._beats.append(time.perf_counter())
                await self.send(b"", Heartbeat())
            due = heartbeat_due_in(self.sent_at, self.heard_at, self.heartbeat_s, loop.time())
            await asyncio.sleep(due if due > 0 else self.heartbeat_s)

    async def _on(self, msg: Any, payload: list[memoryview]) -> None:
        if msg.TYPE in STREAM_TYPES:
            await self.hub.dispatch(b"", msg, payload)
        elif isinstance(msg, Heartbeat) and self._beats:
            self.rtts.append((time.time(), time.perf_counter() - self._beats.popleft()))
        elif isinstance(msg, Welcome):
            self.heartbeat_s = msg.heartbeat_s
        elif isinstance(msg, Task):
            if msg.sid is None:
                await self._answer(msg)
            else:
                self.tasks[msg.sid] = msg
        elif isinstance(msg, EndJob):
            self.ended.set()
        elif not isinstance(msg, Deploy):  # the job's files: no script runs here
            pass

    async def _on_offer(self, peer: bytes, offer: Offer) -> BufferSink | None:
        task = self.tasks.pop(offer.sid, None)
        if task is None:
            return None
        sink = BufferSink(max_total=offer.total)
        asyncio.get_running_loop().create_task(self._after(task, sink))
        return sink

    async def _after(self, task: Task, sink: BufferSink) -> None:
        await sink.result  # the global model: a real site would hand it to its script here
        await self._answer(task)

    async def _answer(self, task: Task) -> None:
        sid = secrets.randbits(62)
        try:
            await self.send(b"", Result(task.job_id, task.task_id, task.version, "DIFF", 1.0, {}, {}, sid))
            await self.hub.send(b"", self.delta, {"job_id": task.job_id, "task_id": task.task_id}, sid)
        except FedbusError:  # refused once the job's time is up: the broker says so, nothing to count
            return
        self.updates += 1


async def _sim_main(address: str, first: int, count: int, model_path: str) -> dict[str, Any]:
    ctx = Context()
    model = serde.read_file(model_path)
    delta = ModelSource.from_state_dict({k: v.mul(0.0).add_(1e-3) for k, v in model.items()})
    prefix = "zz-probe" if first < 0 else "sim"  # probes sort after the job's sites, so the job never takes them
    sites = [SimSite(f"{prefix}{i:05d}", address, ctx, delta) for i in range(abs(first), abs(first) + count)]
    runs = [asyncio.create_task(s.run()) for s in sites]
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for r in runs:
        r.cancel()
    await asyncio.gather(*runs, return_exceptions=True)
    for s in sites:
        s.ep.close()
    ctx.term()
    return {
        "rtts": [r for s in sites for r in s.rtts],
        "updates": sum(s.updates for s in sites),
        "niceness": os.getpriority(os.PRIO_PROCESS, 0),
    }


def sim_main(address: str, first: int, count: int, model_path: str, out: str, nice: int = 0) -> None:
    """Entry point of one simulation process: ``count`` sites until SIGTERM; their figures go to ``out``.
    ``nice``: added to the process's scheduling niceness first (``run_scale``'s ``sim_nice``)."""
    if nice:
        os.nice(nice)
    result = asyncio.run(_sim_main(address, first, count, model_path))
    Path(out).write_text(json.dumps(result))


PROBES = 10
"""Idle sites in a process of their own whose heartbeat round trips are reported (see ``run_scale``)."""


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _percentiles(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=100) if len(values) >= 2 else [float("nan")] * 99


def _write_job(folder: Path, size_kb: float, sites: int, buffer: int, seconds: float) -> Path:
    folder.mkdir(parents=True)
    (folder / "client.py").write_text("# simulated sites run no script\n")
    model = random_state_dict(size_kb / 1024, seed=0)
    serde.write_file(folder / "model.safetensors", serde.layout(model))
    (folder / "job.toml").write_text(
        f'name = "scale"\nmodel = "model.safetensors"\n\n[strategy]\nname = "fedbuff"\nconcurrency = {sites}\n'
        f"buffer_size = {buffer}\ntime_budget = {seconds}\n\n"
        f'[script]\npath = "client.py"\nargs = []\n\n[sites]\nmin = {sites}\nmax = {sites}\n'
    )
    return folder / "model.safetensors"


def run_scale(
    sites: int,
    size_kb: float = 100,
    seconds: float = 20,
    procs: int = 2,
    buffer: int = 50,
    heartbeat_s: float = 1.0,
    sim_nice: int = 10,
) -> str:
    """Run the benchmark; returns the report (a table, then one JSON line). ``sim_nice``: the simulator
    processes' niceness (0-19; see the module's doc)."""
    if not 0 <= sim_nice <= 19:
        raise ValueError(f"sim_nice must be in [0, 19], got {sim_nice}")
    tmp = Path(tempfile.mkdtemp(prefix="fedbus-bench-scale-"))
    children: list[subprocess.Popen] = []
    try:
        model_path = _write_job(tmp / "job", size_kb, sites, buffer, seconds)
        address = _free_tcp()
        cfg = tmp / "broker.toml"
        cfg.write_text(f"heartbeat_s = {heartbeat_s}\n")
        args = ["broker", "--bind", address, "--workspace", str(tmp / "broker"), "--config", str(cfg)]
        broker = _daemon(args, tmp / "broker.log", 1, "info")  # info: "broker listening" says it is ready
        children.append(broker)
        _wait_listening(tmp / "broker.log", broker)
        base_rss = _proc_kb(broker.pid, "VmRSS")
        per = -(-sites // procs)
        outs = []
        for k in range(procs):
            first, count = k * per, min(per, sites - k * per)
            if count <= 0:
                break
            outs.append(tmp / f"sim{k}.json")
            argv = [sys.executable, "-m", "fedbus.bench.scale", address, str(first), str(count), str(model_path)]
            argv += [str(outs[-1]), str(sim_nice)]
            children.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
        # Probes: a few sites in a process of their own that only heartbeat, so their round trips show the
        # broker's answer time rather than the backlog of a simulator process running 500 busy sites.
        outs.append(tmp / "probes.json")
        argv = [sys.executable, "-m", "fedbus.bench.scale", address, "-1", str(PROBES), str(model_path)]
        children.append(subprocess.Popen([*argv, str(outs[-1])], stdout=subprocess.PIPE, text=True))
        for child in children[1:]:
            assert child.stdout is not None
            child.stdout.readline()
        proc = psutil.Process(broker.pid)
        sim_procs = [psutil.Process(c.pid) for c in children[1:]]
        cpu0, sim0, t0 = proc.cpu_times(), _cpu(sim_procs), time.time()
        result = asyncio.run(_run_job(address, tmp / "job", seconds * 3 + 120))
        cpu1, sim1, t1 = proc.cpu_times(), _cpu(sim_procs), time.time()
        peak = _proc_kb(broker.pid, "VmHWM")
        rss_end = _proc_kb(broker.pid, "VmRSS")
    finally:
        stop_all(children, grace=30.0)
    if result["state"] != "finished":
        raise RuntimeError(f"scale job {result['state']}: {result['reason']} (logs in {tmp})")
    times = [h["time"] for h in result["history"]]
    if len(times) < 3:
        raise RuntimeError(f"only {len(times) - 1} versions in {seconds} s: too few to measure (logs in {tmp})")
    w0, w1 = times[1], times[-1]
    rate = buffer * (len(times) - 2) / (w1 - w0)
    sims = [json.loads(o.read_text()) for o in outs[:-1] if o.exists()]
    probes = json.loads(outs[-1].read_text()) if outs[-1].exists() else {"rtts": []}
    rtts = sorted(r for t, r in probes["rtts"] if w0 <= t <= w1)
    q = _percentiles(rtts)
    loaded = _percentiles(sorted(r for s in sims for t, r in s["rtts"] if w0 <= t <= w1))
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (t1 - t0)
    out = {
        "sites": sites,
        "size_kb": size_kb,
        "buffer": buffer,
        "seconds": seconds,
        "sim_procs": len(outs) - 1,
        "heartbeat_s": heartbeat_s,
        "sim_nice": max((s["niceness"] for s in sims), default=0) - os.getpriority(os.PRIO_PROCESS, 0),
        "updates_per_s": round(rate, 1),
        "versions": len(times) - 1,
        "accepted": sum(1 for u in result["updates"] if u["accepted"]),
        "hb_p50_ms": round(q[49] * 1e3, 2),
        "hb_p99_ms": round(q[98] * 1e3, 2),
        "heartbeats": len(rtts),
        "hb_loaded_p50_ms": round(loaded[49] * 1e3, 2),
        "hb_loaded_p99_ms": round(loaded[98] * 1e3, 2),
        "broker_cpu": round(cpu, 3),
        "sims_cpu": round((sim1 - sim0) / (t1 - t0), 3),
        "broker_rss_mb": round(rss_end / 2**20, 1),
        "broker_rss_growth_mb": round((peak - base_rss) / 2**20, 1),
    }
    shutil.rmtree(tmp, ignore_errors=True)
    rows = [
        (
            "sites",
            f"{sites} simulated sites in {len(outs) - 1} processes at nice {sim_nice}, heartbeat {heartbeat_s:g} s",
        ),
        ("job", f"FedBuff, {size_kb:g} KB model, buffer {buffer}, {seconds:g} s"),
        ("updates", f"{rate:.0f} accepted updates/s ({out['versions']} versions)"),
        ("hb rtt", f"p50 {out['hb_p50_ms']} ms, p99 {out['hb_p99_ms']} ms ({len(rtts)} beats, {PROBES} probes)"),
        ("hb busy", f"p50 {out['hb_loaded_p50_ms']} ms, p99 {out['hb_loaded_p99_ms']} ms (incl. own lag)"),
        ("cpu", f"simulators {out['sims_cpu']:.2f} CPU s/s (all processes)"),
        ("broker", f"{cpu:.2f} CPU s/s, RSS {out['broker_rss_mb']} MB (+{out['broker_rss_growth_mb']} MB)"),
    ]
    return format_report(rows, out)


if __name__ == "__main__":
    sim_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], *map(int, sys.argv[6:7]))
