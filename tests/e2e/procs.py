"""Real daemons as child processes for end-to-end tests: started on loopback/ipc, always ended."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FEDBUS = [sys.executable, "-m", "fedbus.cli"]


class Daemon:
    """A fedbus daemon process whose JSON log lines are collected in the background."""

    def __init__(self, args: list[str], log_path: Path, *, command: list[str] = FEDBUS) -> None:
        self.log_path = log_path
        self.lines: list[dict] = []
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [*command, *args, "--log-json"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._log.write(line)
            self._log.flush()
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(line))

    def wait_for(self, event: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in list(self.lines):
                if rec.get("event") == event:
                    return rec
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {event!r} log line within {timeout} s; log: {self.log_path.read_text()[-3000:]}")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self._log.close()
        return self.proc.returncode


def start_broker(tmp: Path, *extra: str) -> tuple[Daemon, str]:
    broker = Daemon(
        [
            "broker",
            "--bind",
            "tcp://127.0.0.1:0",
            "--workspace",
            str(tmp / "broker"),
            "--config",
            str(ROOT / "brokers/poc.toml"),
            *extra,
        ],
        tmp / "broker.log",
    )
    rec = broker.wait_for("broker listening")
    return broker, rec["address"]


def start_site(tmp: Path, name: str, address: str) -> Daemon:
    return Daemon(["site", "--name", name, "--broker", address, "--workspace", str(tmp / name)], tmp / f"{name}.log")


@contextlib.contextmanager
def federation(tmp: Path, sites: int = 3) -> Iterator[tuple[Daemon, str, list[Daemon]]]:
    broker, address = start_broker(tmp)
    members: list[Daemon] = []
    try:
        for i in range(sites):
            members.append(start_site(tmp, f"site-{i + 1}", address))
        yield broker, address, members
    finally:
        for d in [*members, broker]:
            d.stop()
