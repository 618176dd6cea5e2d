"""``fedbus bench soak``: a FedBuff job on real site processes while sites and the broker are SIGKILLed.

One broker and N site daemons run as processes on this machine (each site starts its training script as a
child, as in production); every ``kill_every`` seconds one of them, chosen at random (the broker one time
in four), is SIGKILLed and started again a moment later on the same workspace. After ``minutes`` the
killing stops, the federation gets a short quiet spell, and everything is stopped.

Then the books are checked against each other:

* acknowledged: each site's own log says the broker acknowledged the update ("result delivered",
  or "interrupted upload delivered" for an upload resumed after the site was killed);
* accepted / dropped: the broker's store, which records every update it counted and every one it refused
  or lost in an aggregate it could not checkpoint, with the reason;
* lost: acknowledged to a site, yet neither accepted nor dropped with a reason. It must be 0.

Updates a site could not deliver (the broker was down: "update lost on the way to the broker") were
never acknowledged, so the site knows; they are reported as not delivered.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from fedbus.bench.common import format_report
from fedbus.modelio import serde
from fedbus.recipes.poc import read_json_lines

SCRIPT = """
import random, time
import fedbus.client as flare

flare.init()
rng = random.Random(flare.get_site_name())
while flare.is_running():
    model = flare.receive()
    if model is None:
        break
    params = {k: v + 0.01 * rng.random() for k, v in model.params.items()}
    time.sleep(rng.uniform(0.5, 2.0))
    flare.send(flare.FLModel(params=params, metrics={"loss": rng.random()}, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""

SETTLE_S = 20.0


class Proc:
    """One daemon process, restartable with the same arguments; stderr (JSON log lines) appended to a file."""

    def __init__(self, name: str, args: list[str], log_path: Path) -> None:
        self.name, self.args, self.log_path = name, args, log_path
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedbus.cli", *self.args, "--log-json"],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
        self.starts += 1

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _write_job(folder: Path, sites: int, seed: int) -> None:
    folder.mkdir(parents=True)
    (folder / "client.py").write_text(SCRIPT)
    g = torch.Generator().manual_seed(seed)
    serde.write_file(folder / "model.safetensors", serde.layout({"w": torch.randn(256, 256, generator=g)}))
    buffer = max(2, sites // 4)
    (folder / "job.toml").write_text(
        f'name = "soak"\nmodel = "model.safetensors"\n\n[strategy]\nname = "fedbuff"\nconcurrency = {sites}\n'
        f"buffer_size = {buffer}\nnum_versions = 1000000\nmax_staleness = {4 * sites // buffer}\n\n"
        f'[script]\npath = "client.py"\nargs = []\n\n[sites]\nmin = {sites}\nmax = {sites}\n'
    )


def _wait_log(path: Path, event: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rec in read_json_lines(path):
            if rec.get("event") == event:
                return rec
        time.sleep(0.2)
    raise RuntimeError(f"no {event!r} in {path} within {timeout} s")


def _submit(address: str, folder: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "fedbus.cli", "submit", str(folder), "--broker", address, "--timeout", "120"],
        capture_output=True,
        text=True,
        check=True,
        timeout=180,
    )
    return out.stdout.strip().splitlines()[-1]


def run_soak(sites: int = 20, minutes: float = 10.0, kill_every: float = 30.0, seed: int = 0) -> tuple[str, dict]:
    """Run the soak; returns the report and its figures (``lost`` must be 0)."""
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="fedbus-soak-"))
    address = f"ipc://{root}/broker.sock"
    (root / "broker.toml").write_text("heartbeat_s = 0.5\nliveness = 10\nstall_timeout_s = 30.0\n")
    broker = Proc(
        "broker",
        ["broker", "--bind", address, "--workspace", str(root / "broker"), "--config", str(root / "broker.toml")],
        root / "broker.log",
    )
    members = [
        Proc(
            f"site-{i}",
            ["site", "--name", f"site-{i}", "--broker", address, "--workspace", str(root / f"site-{i}")],
            root / f"site-{i}.log",
        )
        for i in range(1, sites + 1)
    ]
    kills: collections.Counter[str] = collections.Counter()
    site_kills: list[tuple[str, float]] = []  # (site, wall time of the kill): how soon the broker noticed
    t0 = time.monotonic()
    try:
        broker.start()
        _wait_log(broker.log_path, "broker listening", 120)
        for s in members:
            s.start()
        _write_job(root / "job", sites, seed)
        job_id = _submit(address, root / "job")
        _wait_log(broker.log_path, "job started", 600)
        started_s = time.monotonic() - t0
        end = time.monotonic() + minutes * 60
        while time.monotonic() + kill_every <= end:
            time.sleep(kill_every)
            victim = broker if rng.random() < 0.25 else rng.choice(members)
            victim.kill()
            kills[victim.name if victim is broker else "site"] += 1
            if victim is not broker:
                site_kills.append((victim.name, time.time()))
            time.sleep(rng.uniform(0.5, 3.0))
            victim.start()
        time.sleep(max(0.0, end - time.monotonic()))
        for p in [broker, *members]:  # anything that died by itself comes back for the quiet spell
            if not p.alive():
                p.start()
        time.sleep(SETTLE_S)
    finally:  # the broker first: sites stopping under a running job refuse its downloads and would fail it
        try:
            broker.stop()
        finally:
            for s in members:
                s.stop()
    figures = _books(root, job_id, sites, kills, [broker, *members])
    figures.update(sites=sites, minutes=minutes, kill_every_s=kill_every, seconds_to_start=round(started_s, 1))
    figures.update(_detection(root / "broker.log", site_kills))
    rows = [(k, v) for k, v in figures.items() if k != "lost_task_ids"]
    return format_report(rows, figures), figures


def _detection(broker_log: Path, site_kills: list[tuple[str, float]]) -> dict[str, Any]:
    """Seconds from each site kill to the broker's "site gone". A site that is back before its liveness ran
    out simply registers again and is never declared gone: only a kill whose next event is "site gone" counts.
    """
    events = [
        (rec["site"], _wall(rec["timestamp"]), rec["event"])
        for rec in read_json_lines(broker_log)
        if rec.get("event") in ("site gone", "site registered") and rec.get("site") and rec.get("timestamp")
    ]
    delays = []
    for site, at in site_kills:
        after = sorted((t, kind) for s, t, kind in events if s == site and t >= at)
        if after and after[0][1] == "site gone":
            delays.append(after[0][0] - at)
    return {
        "site_kills_declared_gone": len(delays),
        "declared_gone_after_s_max": round(max(delays), 2) if delays else None,
    }


def _wall(stamp: Any) -> float:
    return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()


def _books(root: Path, job_id: str, sites: int, kills: collections.Counter[str], procs: list[Proc]) -> dict:
    acked: set[str] = set()
    undelivered = 0
    for i in range(1, sites + 1):
        for rec in read_json_lines(root / f"site-{i}.log"):
            if rec.get("event") in ("result delivered", "interrupted upload delivered") and rec.get("task_id"):
                acked.add(str(rec["task_id"]))
            elif rec.get("event") in ("update lost on the way to the broker", "interrupted upload lost"):
                undelivered += 1
    db = sqlite3.connect(root / "broker" / "fedbus.db")
    rows = db.execute("SELECT task_id, accepted, reason FROM updates WHERE job_id = ? ORDER BY rowid", (job_id,))
    final: dict[str, tuple[int, str]] = {}
    for task_id, accepted, reason in rows:
        final[task_id] = (accepted, reason)
    version = db.execute("SELECT version FROM jobs WHERE id = ?", (job_id,)).fetchone()
    db.close()
    accepted = {t for t, (a, _) in final.items() if a}
    dropped = {t: r for t, (a, r) in final.items() if not a}
    reasons = collections.Counter(_reason_kind(r) for r in dropped.values())
    lost = sorted(acked - set(final))
    return {
        "kills": dict(kills),
        "restarts": {p.name: p.starts - 1 for p in procs if p.starts > 1},
        "versions": version[0] if version else None,
        "sent_acknowledged": len(acked),
        "not_delivered_site_knew": undelivered,
        "accepted": len(accepted),
        "dropped": len(dropped),
        "dropped_reasons": dict(reasons),
        "lost": len(lost),
        "lost_task_ids": lost[:20],
        "acked_and_accepted": len(acked & accepted),
        "workspace": str(root),
    }


def _reason_kind(reason: str) -> str:
    """A reason without its numbers and names, so that counts group by cause."""
    words = [w for w in reason.replace(":", " ").split() if not any(c.isdigit() for c in w) and "'" not in w]
    return " ".join(words[:8])
