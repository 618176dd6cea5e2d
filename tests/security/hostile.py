"""Hostile peers for the security tests: hand-built pyzmq/msgpack messages from raw sockets that never read, a
broker as a real process (``tests.e2e.procs.Daemon``) with a profile of the test's own, and a tiny job."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import zmq

from fedbus.admin import Admin
from fedbus.audit import read_audit
from fedbus.modelio import serde
from fedbus.protocol.envelope import decode, encode
from fedbus.protocol.messages import Message
from tests.broker.harness import SCRIPT
from tests.e2e.procs import Daemon

PROFILE = """
bind = "tcp://127.0.0.1:0"
workspace = "{workspace}"
heartbeat_s = 0.2
liveness = 10
log_level = "info"
"""


def start_broker(tmp: Path, extra: str = "") -> tuple[Daemon, str]:
    """A broker process on an ephemeral port with the test's profile (``extra``: more keys)."""
    profile = tmp / "broker.toml"
    profile.write_text(PROFILE.format(workspace=tmp / "broker") + extra)
    broker = Daemon(["broker", "--config", str(profile)], tmp / "broker.log")
    rec = broker.wait_for("broker listening")
    return broker, rec["address"]


def stop_promptly(broker: Daemon, within: float = 10.0) -> int:
    """SIGTERM; the broker must have exited within ``within`` seconds (a liveness bound, not a timing one)."""
    broker.proc.send_signal(signal.SIGTERM)
    try:
        broker.proc.wait(within)
    except subprocess.TimeoutExpired:
        broker.stop(0.1)
        raise AssertionError(f"the broker ignored SIGTERM for {within} s") from None
    return broker.stop()


def write_job(folder: Path, strategy: str, *, sites: int = 1, size: int = 10) -> Path:
    """A tiny job (``tests.broker.harness``'s script) over ``sites`` sites; ``size``: floats in its model."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "client.py").write_text(SCRIPT)
    serde.write_file(folder / "model.safetensors", serde.layout({"w": torch.zeros(size)}))
    (folder / "job.toml").write_text(
        f'name = "hostile"\nmodel = "model.safetensors"\n\n[strategy]\n{strategy}\n'
        f'[script]\npath = "client.py"\nargs = ["ok"]\n\n[sites]\nmin = {sites}\nmax = {sites}\n'
    )
    return folder


async def run_job(admin: Admin, folder: Path | None, timeout: float = 60.0, *, job_id: str = "") -> dict:
    """Submit ``folder`` (or follow ``job_id``) and wait (bounded) until the job is final."""
    if folder is not None:
        job_id = await admin.submit(folder)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        job = (await admin.status(job_id))["jobs"][0]
        if job["state"] in ("finished", "failed", "aborted"):
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} not done within {timeout} s")


class NonReader:
    """A raw DEALER that sends what it is told and never reads (its receive queue as small as zmq allows).

    ``flood(make, n)`` sends ``n`` messages built by ``make(i)`` (frames) from a thread; ``keep_flooding``
    goes on until ``close``. Sends give up after a second without room (the broker stopped reading us)."""

    def __init__(self, address: str, identity: bytes, *, curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, identity)
        self.sock.setsockopt(zmq.RCVHWM, 1)
        self.sock.setsockopt(zmq.RCVBUF, 4096)
        self.sock.setsockopt(zmq.SNDTIMEO, 1000)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            self.sock.setsockopt(zmq.CURVE_SERVERKEY, curve[0])
            self.sock.setsockopt(zmq.CURVE_PUBLICKEY, curve[1])
            self.sock.setsockopt(zmq.CURVE_SECRETKEY, curve[2])
        self.sock.connect(address)
        self.sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def send(self, msg: Message, *payload: bytes) -> None:
        with self._lock:
            self.sock.send_multipart([encode(msg, self.sent + 1), *payload])
            self.sent += 1

    def read_until(self, pred: Callable[[Message], bool], timeout: float = 30.0) -> Message:
        """Read (this once) until a message for which ``pred`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                msg, _ = decode(self.sock.recv_multipart()[0])
                if pred(msg):
                    return msg
        raise AssertionError("the awaited message did not come")

    def flood(self, make: Callable[[int], list[bytes]], n: int) -> int:
        """Send ``n`` messages (fewer if the broker stops taking them); returns how many went."""
        sent = 0
        with self._lock:
            for i in range(n):
                try:
                    self.sock.send_multipart(make(i))
                except zmq.Again:
                    break
                sent += 1
        return sent

    def keep_flooding(self, make: Callable[[int], list[bytes]], batch: int = 100) -> None:
        """Send ``batch`` messages a millisecond (about) in a thread until closed."""

        def run() -> None:
            i = 0
            while not self._stop.is_set():
                with self._lock, contextlib.suppress(zmq.Again):
                    for _ in range(batch):
                        self.sock.send_multipart(make(i), zmq.NOBLOCK)
                        i += 1
                time.sleep(0.001)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sock.close(0)
        self.ctx.term()


def peer_lines(broker: Daemon, peer: str) -> list[dict]:
    """The broker's log records about ``peer`` (its routing id or participant name)."""
    return [r for r in list(broker.lines) if peer in str(r.get("peer", "")) or r.get("user") == peer]


def counted(lines: list[dict]) -> int:
    """Refusals the records account for (each first refusal and each burst record has a ``count``)."""
    return sum(int(r.get("count", 0)) for r in lines)


def wait_counted(broker: Daemon, peer: str, n: int, timeout: float = 20.0) -> list[dict]:
    """Poll (bounded) until the log accounts for ``n`` refusals of ``peer``; returns its records."""
    deadline = time.monotonic() + timeout
    while True:
        lines = peer_lines(broker, peer)
        if counted(lines) >= n or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def audit(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "broker" / "audit.jsonl"
    return list(read_audit(path)) if path.exists() else []


@contextlib.contextmanager
def non_reader(address: str, identity: bytes, **kw: Any) -> Iterator[NonReader]:
    peer = NonReader(address, identity, **kw)
    try:
        yield peer
    finally:
        peer.close()
