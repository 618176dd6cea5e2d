"""``fedbus bench abuse``: a broker serving good sites in a FedBuff job while hostile peers attack it.

A real broker process, with CURVE (keys provisioned for every participant, as a production kit) or in
plaintext. ``sites`` good sites (``fedbus.bench.scale.SimSite``: the real protocol, an instant DIFF answer to
every task, no script) train in one process; the attackers run in another (``fedbus.bench.abuse_peers``),
``attackers`` peers per attack:

* ``refused``: messages the broker must refuse, as fast as it takes them: with CURVE, valid heartbeats from a
  routing id that is not the key's own; in plaintext, garbage frames before any hello. These peers read.
* ``bytes``: sites of the job that send the largest job events they may (``log`` text records, ``log_text``
  batches, events over the record cap) as fast as the broker reads.
* ``slowloris``: sites of the job whose uploads take credit and never send a chunk.
* ``reconnect``: connect, hello, disconnect, in a loop.
* ``nonreading``: stream-type messages (``credit``) before hello, as fast as the socket takes them, never reading.

Each attack has three phases on one running job: ``quiet`` (the baseline), ``attack`` (the attackers at
work), ``recover`` (they have left: closed their sockets without a word, as a hostile peer would). The
attackers of the job's own sites (``bytes``, ``slowloris``) are in the job from its start and behave until
their phase. Figures per attack: the good sites' accepted updates per second in the attack against the quiet
phase just before it (``ratio``); the seconds from the attackers' leaving until the good sites' rate is back to
``RECOVERED`` of quiet (``recover_s``, measured over a sliding window); the broker's CPU (CPU s/s) and RSS, and
the disk growth of its workspace during the attack, against the byte budgets of the profile
(``BUDGET_MB``); whether the broker still answers an admin at the end. A broker that
does not answer within ``PROBE_S`` is reported ``unresponsive`` and replaced (the next attack starts on a new
broker and job); every wait is bounded, so a hung broker never hangs the bench.

Goals (``ok``): ``ratio >= 0.8``, ``recover_s <= 2``, the broker responsive, and its disk growth within the
budgets. Last line: JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from fedbus.bench.abuse_peers import CHUNK, INSIDERS, keys_of
from fedbus.bench.common import format_report, random_state_dict
from fedbus.bench.round import _daemon, _free_tcp, _wait_listening
from fedbus.modelio import serde
from fedbus.provision import provision

ATTACKS = ("refused", "bytes", "slowloris", "reconnect", "nonreading")
RECOVERED = 0.8
GOAL_RECOVER_S = 2.0
PROBE_S = 5.0
"""Seconds an admin waits for the broker's answer before the broker is declared unresponsive."""
PROFILE = """heartbeat_s = 0.5
liveness = 4
upload_stall_s = 1.0
chunk_mb = {chunk_mb}
keep_versions = 2
event_record_kb = 128
events_mb_per_site = 4
events_mb_per_job = 16
logs_mb_per_site = 4
logs_mb_per_job = 16
"""
# upload_stall_s: the bench's chunks (abuse_peers.CHUNK, 64 KiB) cross loopback in well under a millisecond, so a
# credited upload with no chunk for 1 s is stalled by the same reasoning as the default's 10 s for 2 MiB chunks
# over a slow link; the default would outlast the attack phase itself (5 s).
BUDGET_MB = 2 * 16 + 16
"""What a job's store may grow by in the profile above: ``logs_mb_per_job`` plus twice ``events_mb_per_job``, since
SQLite's write-ahead log holds a copy of the pages written until a checkpoint moves them into the database (the
log file keeps its size for reuse)."""


# --- one federation: broker, good sites, insiders, a job ------------------------------------------------------


@dataclass
class Federation:
    tmp: Path
    address: str
    kits: Path | None
    broker: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)
    outs: list[Path] = field(default_factory=list)
    job_id: str = ""

    def tell(self, line: str) -> None:
        for w in self.workers:
            if w.poll() is None and w.stdin is not None:
                with contextlib.suppress(OSError):
                    w.stdin.write(line + "\n")
                    w.stdin.flush()


def _project(tmp: Path, sites: int, attackers: int) -> Path:
    names = [f"good-{i}" for i in range(sites)]
    names += [f"{kind}-{i}" for kind in ATTACKS for i in range(attackers)]
    parts = "".join(f'[[participant]]\nname = "{n}"\nrole = "site"\n\n' for n in names)
    project = tmp / "project.toml"
    project.write_text(
        f'name = "abuse"\nbroker = "tcp://127.0.0.1:7788"\n\n{parts}[[participant]]\nname = "ops"\nrole = "admin"\n'
    )
    provision(project, tmp / "kits")
    return tmp / "kits"


def _spawn_worker(fed: Federation, spec: dict[str, Any], name: str) -> None:
    out = fed.tmp / f"{name}.json"
    spec = {**spec, "address": fed.address, "kits": str(fed.kits) if fed.kits else None, "out": str(out)}
    path = fed.tmp / f"{name}.spec.json"
    path.write_text(json.dumps(spec))
    with open(fed.tmp / f"{name}.log", "w") as err:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedbus.bench.abuse_peers", str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    fed.workers.append(proc)
    fed.outs.append(out)


def _admin(fed: Federation) -> Any:
    from fedbus.admin import Admin

    keys = keys_of(str(fed.kits), "ops") if fed.kits else None
    return Admin(fed.address, keys=keys, name="ops", timeout=PROBE_S)


async def _start(
    tmp: Path, sites: int, attackers: int, insiders: list[str], kits: Path | None, size_kb: float, nice: int
) -> Federation:
    tmp.mkdir(parents=True)
    model = tmp / "job" / "model.safetensors"
    model.parent.mkdir()
    serde.write_file(model, serde.layout(random_state_dict(size_kb / 1024, seed=0)))
    members = sites + attackers * len(insiders)
    (tmp / "job" / "client.py").write_text("# simulated sites run no script\n")
    (tmp / "job" / "job.toml").write_text(
        f'name = "abuse"\nmodel = "model.safetensors"\n\n[strategy]\nname = "fedbuff"\nconcurrency = {members}\n'
        f"buffer_size = {max(2, sites // 2)}\ntime_budget = 36000\n\n"
        f'[script]\npath = "client.py"\nargs = []\n\n[sites]\nmin = {members}\nmax = {members}\n'
    )
    cfg = tmp / "broker.toml"
    profile = PROFILE.format(chunk_mb=CHUNK / (1 << 20))
    if kits is not None:
        profile += f'secret_key = "{kits}/broker/broker.key_secret"\nparticipants = "{kits}/broker/participants.toml"\n'
    cfg.write_text(profile)
    address = _free_tcp()
    args = ["broker", "--bind", address, "--workspace", str(tmp / "broker"), "--config", str(cfg)]
    broker = _daemon(args, tmp / "broker.log", 1, "info")
    fed = Federation(tmp, address, kits, broker)
    common = {"model": str(model), "count": sites}  # the workers start with the broker: their sites dial until it binds
    _spawn_worker(fed, {**common, "role": "good"}, "good")
    _spawn_worker(fed, {**common, "role": "attack", "count": attackers, "insiders": insiders, "nice": nice}, "attack")
    await asyncio.to_thread(_wait_listening, tmp / "broker.log", broker)
    for w in fed.workers:
        assert w.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(w.stdout.readline), 60)
        if line.strip() != "ready":
            raise RuntimeError(f"a bench worker did not start (logs in {tmp})")
    async with _admin(fed) as admin:
        fed.job_id = await admin.submit(tmp / "job")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = (await admin.status(fed.job_id))["jobs"][0]
            if job["version"] >= 1:
                break
            if job["state"] in ("finished", "failed", "aborted"):
                raise RuntimeError(f"the bench job {job['state']}: {job['reason']} (logs in {tmp})")
            await asyncio.sleep(0.2)
        else:
            raise RuntimeError(f"the bench job published nothing in 60 s (logs in {tmp})")
    return fed


def _stop(fed: Federation) -> dict[str, Any]:
    """Stop the workers (their figures) and the broker: how long it took to exit on SIGTERM."""
    fed.tell("stop")
    term = time.monotonic()
    if fed.broker.poll() is None:
        fed.broker.send_signal(signal.SIGTERM)
    try:
        fed.broker.wait(10)
        sigterm_s: float | None = round(time.monotonic() - term, 2)
    except subprocess.TimeoutExpired:
        fed.broker.kill()
        fed.broker.wait()
        sigterm_s = None
    times: list[float] = []
    sent: dict[str, int] = {}
    for w, out in zip(fed.workers, fed.outs, strict=True):
        try:
            w.wait(15)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()
        if out.exists():
            got = json.loads(out.read_text())
            times += got["times"]
            sent.update(got["sent"])
        for pipe in (w.stdin, w.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
    return {"times": sorted(times), "sent": sent, "sigterm_s": sigterm_s}


# --- phases and figures --------------------------------------------------------------------------------------


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


async def _responsive(fed: Federation) -> bool:
    try:
        async with asyncio.timeout(PROBE_S * 2):
            async with _admin(fed) as admin:
                await admin.status(fed.job_id)
        return True
    except Exception:  # any failure to answer in time is the finding
        return False


async def _phases(fed: Federation, kind: str, seconds: float, recover_s: float) -> dict[str, Any]:
    proc = psutil.Process(fed.broker.pid)
    q0 = time.time() + 0.5
    a0, a1 = q0 + seconds, q0 + 2 * seconds
    end = a1 + recover_s
    fed.tell(f"go {kind} {a0} {a1}")
    marks: dict[str, Any] = {}
    rss_peak = 0
    while (now := time.time()) < end:
        try:
            t = proc.cpu_times()
            rss = proc.memory_info().rss
        except psutil.Error:
            break
        for name, at in (("q0", q0), ("a0", a0), ("a1", a1)):
            if name not in marks and now >= at:
                marks[name] = (t.user + t.system, rss, _du(fed.tmp / "broker"), now)
        if "a0" in marks and "a1" not in marks:
            rss_peak = max(rss_peak, rss)
        await asyncio.sleep(0.1)
    return {"q0": q0, "a0": a0, "a1": a1, "end": end, "marks": marks, "rss_peak": rss_peak}


def _rate(times: list[float], start: float, end: float) -> float:
    return sum(1 for t in times if start <= t < end) / max(end - start, 1e-9)


def _figures(kind: str, times: list[float], ph: dict[str, Any], responsive: bool) -> dict[str, Any]:
    q0, a0, a1, end, marks = ph["q0"], ph["a0"], ph["a1"], ph["end"], ph["marks"]
    quiet, attack = _rate(times, q0, a0), _rate(times, a0, a1)
    window = max(1.0, 10 / quiet) if quiet > 0 else 1.0
    recover = None
    t = a1
    while t + window <= end:
        if quiet > 0 and _rate(times, t, t + window) >= RECOVERED * quiet:
            recover = round(t - a1, 2)
            break
        t += 0.05
    out: dict[str, Any] = {
        "attack": kind,
        "quiet_ups": round(quiet, 1),
        "attack_ups": round(attack, 1),
        "ratio": round(attack / quiet, 2) if quiet > 0 else None,
        "recover_s": recover,
        "responsive": responsive,
    }
    if "a0" in marks and "a1" in marks:
        (c0, r0, d0, t0), (c1, _, d1, t1) = marks["a0"], marks["a1"]
        out["broker_cpu"] = round((c1 - c0) / (t1 - t0), 2)
        out["rss_mb"] = round(r0 / 2**20, 1)
        out["rss_growth_mb"] = round((ph["rss_peak"] - r0) / 2**20, 1)
        out["disk_growth_mb"] = round((d1 - d0) / 2**20, 1)
        if "q0" in marks:
            cq, _, dq, tq = marks["q0"]
            out["quiet_cpu"] = round((c0 - cq) / (t0 - tq), 2)
            out["quiet_disk_growth_mb"] = round((d0 - dq) / 2**20, 1)
    else:
        out["broker_cpu"] = None  # the broker died during the attack
    out["ok"] = bool(
        responsive
        and out["ratio"] is not None
        and out["ratio"] >= RECOVERED
        and recover is not None
        and recover <= GOAL_RECOVER_S
        and out.get("disk_growth_mb", BUDGET_MB + 1) <= BUDGET_MB + max(0.0, out.get("quiet_disk_growth_mb", 0.0)) + 1
    )
    return out


async def _mode(mode: str, attacks: list[str], opts: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    """Every attack in ``mode``: on one broker and job (a new one after a broker stopped answering), or each on
    its own (``fresh``)."""
    tmp.mkdir(parents=True, exist_ok=True)
    kits = _project(tmp, opts["sites"], opts["attackers"]) if mode == "curve" else None
    rows: list[dict[str, Any]] = []
    left = list(attacks)
    n = 0
    while left:
        n += 1
        batch = left[:1] if opts["fresh"] else left
        insiders = [k for k in batch if k in INSIDERS]
        fed = await _start(
            tmp / f"{mode}-{n}", opts["sites"], opts["attackers"], insiders, kits, opts["size_kb"], opts["nice"]
        )
        phases: list[tuple[str, dict[str, Any], bool]] = []
        try:
            for kind in list(batch):
                left.remove(kind)
                ph = await _phases(fed, kind, opts["seconds"], opts["recover_s"])
                alive = await _responsive(fed)
                phases.append((kind, ph, alive))
                if not alive:
                    break  # the next attack gets a new broker
        finally:
            stopped = await asyncio.to_thread(_stop, fed)
        for kind, ph, alive in phases:
            row = _figures(kind, stopped["times"], ph, alive)
            row.update(mode=mode, sent=stopped["sent"].get(kind, 0))
            rows.append(row)
        rows[-1]["sigterm_s"] = stopped["sigterm_s"]
    return rows


def run_abuse(
    *,
    sites: int = 4,
    attackers: int = 4,
    attacks: list[str] | None = None,
    seconds: float = 5.0,
    recover_s: float = 4.0,
    modes: tuple[str, ...] = ("plain", "curve"),
    size_kb: float = 256,
    fresh: bool = True,
    attacker_nice: int = 10,
) -> tuple[str, dict[str, Any]]:
    """Run the bench; returns the report (a table, then one JSON line) and its figures. ``fresh``: each attack on
    a broker and job of its own (else one broker takes them in turn: quicker, each quiet phase then follows the
    previous attack's recovery). ``attacker_nice``: the attackers' process niceness (0-19): they stand in for
    peers on other machines, which a broker sharing cores with them would otherwise lose CPU to."""
    if not 0 <= attacker_nice <= 19:
        raise ValueError(f"attacker_nice must be in [0, 19], got {attacker_nice}")
    attacks = list(attacks or ATTACKS)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attacks {unknown}: choose from {', '.join(ATTACKS)}")
    opts = {
        "sites": sites,
        "attackers": attackers,
        "seconds": seconds,
        "recover_s": recover_s,
        "size_kb": size_kb,
        "fresh": fresh,
        "nice": attacker_nice,
    }
    tmp = Path(tempfile.mkdtemp(prefix="fedbus-bench-abuse-"))
    rows: list[dict[str, Any]] = []
    try:
        for mode in modes:
            rows += asyncio.run(_mode(mode, attacks, opts, tmp / mode))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures = {
        "sites": sites,
        "attackers": attackers,
        "seconds": seconds,
        "size_kb": size_kb,
        "budget_mb": BUDGET_MB,
        "fresh": fresh,
        "attacker_nice": attacker_nice,
        "results": rows,
        "passed": [f"{r['mode']}:{r['attack']}" for r in rows if r["ok"]],
        "failed": [f"{r['mode']}:{r['attack']}" for r in rows if not r["ok"]],
    }
    table = [
        ("setup", f"{sites} good sites, {attackers} attackers per kind, {seconds:g} s phases, {size_kb:g} KB model"),
        *(
            (
                f"{r['mode']} {r['attack']}",
                f"{r['attack_ups']}/{r['quiet_ups']} updates/s (x{r['ratio']}), recover {r['recover_s']} s, "
                f"cpu {r.get('broker_cpu')}, rss {r.get('rss_mb')} MB (+{r.get('rss_growth_mb')}), "
                f"disk +{r.get('disk_growth_mb')} MB, "
                f"{'ok' if r['ok'] else 'FAIL' if r['responsive'] else 'FAIL: broker unresponsive'}",
            )
            for r in rows
        ),
    ]
    return format_report(table, figures), figures
