"""The peers of ``fedbus bench abuse`` (``fedbus.bench.abuse``), each kind in a worker process of its own.

* ``TimedSite``: a good site (``fedbus.bench.scale.SimSite``: the real protocol, an instant DIFF answer to every
  task) that notes when each of its updates was acknowledged.
* ``Insider``: an attacker that is a site of the job: it behaves until its attack starts, then floods job events
  (``bytes``) or takes upload credit and sends no chunk (``slowloris``), and leaves without a word at the end.
* ``_outsider``: an attacker from outside the job (``refused``, ``reconnect``, ``nonreading``) on a raw
  DEALER socket, so that it reads, or not, exactly as it means to.

A worker (``python -m fedbus.bench.abuse_peers SPEC.json``) starts its peers, says ``ready`` on stdout, then
takes ``go KIND START END`` lines (wall-clock seconds) on stdin until ``stop`` or SIGTERM, and writes its
figures (the good sites' update times, the messages each attack sent) to the spec's ``out``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import zmq

from fedbus.bench.scale import SimSite
from fedbus.modelio import serde
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.envelope import encode
from fedbus.protocol.messages import Chunk, Credit, Heartbeat, Hello, JobEvent, Task
from fedbus.security import ClientKeys
from fedbus.transport.context import Context

INSIDERS = ("bytes", "slowloris")  # attackers that are sites of the job
CHUNK = 64 * 1024
"""The chunk of every stream in the bench (broker profile and sites): a model of several chunks takes an upload
slot, as every real-sized model does."""


class TimedSite(SimSite):
    """A simulated site that notes when each of its updates was acknowledged."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.times: list[float] = []

    async def _answer(self, task: Task) -> None:
        before = self.updates
        await super()._answer(task)
        if self.updates > before:
            self.times.append(time.time())


class Insider(TimedSite):
    """A site of the job that behaves until its attack starts: then floods job events (``bytes``) or takes upload
    credit and sends no chunk (``slowloris``); it leaves without a word when the attack ends."""

    def __init__(self, kind: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kind = kind
        self.attacking = False
        self.sent = 0
        self.job_id = ""

    async def send(self, peer: bytes, msg: Any, payload: Any = ()) -> None:
        if self.attacking and self.kind == "slowloris" and isinstance(msg, Chunk):
            return  # credit taken, nothing sent
        await super().send(peer, msg, payload)

    async def _on(self, msg: Any, payload: list[memoryview]) -> None:
        if isinstance(msg, Task):
            self.job_id = msg.job_id
        await super()._on(msg, payload)

    async def flood(self) -> None:
        text = "x" * (64 * 1024 - 64)  # a text record as long as the broker's check takes
        lines = [text[:8000]] * 8
        events = [
            JobEvent(self.job_id, "log", data={"key": "blob", "value": text, "kind": "text"}),
            JobEvent(self.job_id, "log_text", data={"lines": lines, "dropped": 0}),
            JobEvent(self.job_id, "custom", data={"blob": "y" * 200_000}),  # over the record cap
        ]
        while self.attacking and not self.job_id:  # its first task names the job
            await asyncio.sleep(0.05)
        while self.attacking:
            await self.send(b"", events[self.sent % len(events)])
            self.sent += 1
            if self.sent % 8 == 0:
                await asyncio.sleep(0)  # its own replies are read: a flooder that reads


# --- the attackers from outside the job ---------------------------------------------------------------------


def _socket(ctx: zmq.Context, address: str, identity: bytes | None, keys: ClientKeys | None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    if keys is not None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.connect(address)
    return sock


def _drain(sock: zmq.Socket) -> int:
    n = 0
    with contextlib.suppress(zmq.Again):
        while True:
            sock.recv_multipart(zmq.NOBLOCK)
            n += 1
    return n


async def _outsider(kind: str, address: str, name: str, keys: ClientKeys | None, until: float) -> int:
    """One attacker from outside the job until ``until``; returns the messages (or cycles) it sent."""
    ctx: zmq.Context = zmq.Context.instance()
    token = keys.routing_token() if keys else secrets.token_hex(6)
    sent = 0
    if kind == "reconnect":
        while time.time() < until:
            sock = _socket(ctx, address, f"site:{name}:{token}".encode(), keys)
            with contextlib.suppress(zmq.Again):
                sock.send(encode(Hello(role="site", name=name, session=secrets.token_hex(8))), zmq.NOBLOCK)
                sent += 1
            await asyncio.sleep(0.02)
            sock.close(0)
        return sent
    if kind == "refused":  # with keys: not the key's own routing id; without: garbage
        sock = _socket(ctx, address, f"site:not-{name}:{token}".encode(), keys)
        frame = encode(Heartbeat()) if keys else b"\xc1garbage" + os.urandom(32)
    else:  # nonreading: stream messages before any hello, never reading
        sock = _socket(ctx, address, None, keys)
        frame = encode(Credit(sid=1, until=0))
    while time.time() < until:
        try:
            for _ in range(64):
                sock.send(frame, zmq.NOBLOCK)
                sent += 1
        except zmq.Again:
            await asyncio.sleep(0.001)
        if kind == "refused":
            _drain(sock)
        await asyncio.sleep(0)
    sock.close(0)
    return sent


# --- the two worker processes --------------------------------------------------------------------------------


def keys_of(kits: str | None, name: str) -> ClientKeys | None:
    """The CURVE keys of participant ``name`` from a provisioned ``kits`` folder (None: plaintext)."""
    if kits is None:
        return None
    return ClientKeys.load(Path(kits) / name / f"{name}.key_secret", Path(kits) / name / "broker.key")


async def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The good sites (``spec["role"] == "good"``) or the attackers: ready, then the phases told on stdin
    (``go KIND START END`` in wall-clock seconds), until ``stop`` or SIGTERM."""
    ctx = Context()
    model = serde.read_file(spec["model"])
    delta = ModelSource.from_state_dict({k: torch.full_like(v, 1e-3) for k, v in model.items()})
    address, kits = spec["address"], spec["kits"]
    sites: list[TimedSite] = []
    if spec["role"] == "good":
        names = [f"good-{i}" for i in range(spec["count"])]
        sites = [TimedSite(n, address, ctx, delta, keys=keys_of(kits, n), chunk=CHUNK) for n in names]
    else:
        for kind in spec["insiders"]:
            for i in range(spec["count"]):
                name = f"{kind}-{i}"
                sites.append(Insider(kind, name, address, ctx, delta, keys=keys_of(kits, name), chunk=CHUNK))
    runs = {s.name: asyncio.ensure_future(s.run()) for s in sites}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sent: dict[str, int] = {}
    attacks: list[asyncio.Future] = []

    async def commands() -> None:
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line or line.strip() == "stop":
                stop.set()
                return
            _, kind, start, end = line.split()
            attacks.append(asyncio.ensure_future(_attack(kind, float(start), float(end))))

    async def _attack(kind: str, start: float, end: float) -> None:
        await asyncio.sleep(max(0.0, start - time.time()))
        if kind in INSIDERS:
            mine = [s for s in sites if isinstance(s, Insider) and s.kind == kind]
            floods = []
            for s in mine:
                s.attacking = True
                if kind == "bytes":
                    floods.append(asyncio.ensure_future(s.flood()))
            await asyncio.sleep(max(0.0, end - time.time()))
            for s in mine:  # they leave without a word
                s.attacking = False
                runs[s.name].cancel()
                s.ep.close()
            await asyncio.gather(*floods, return_exceptions=True)
            sent[kind] = sum(s.sent for s in mine)
            return
        names = [f"{kind}-{i}" for i in range(spec["count"])]
        peers = [asyncio.ensure_future(_outsider(kind, address, n, keys_of(kits, n), end)) for n in names]
        sent[kind] = sum(await asyncio.gather(*peers))

    reader = asyncio.ensure_future(commands())
    await stop.wait()
    reader.cancel()
    for task in [*attacks, *runs.values()]:
        task.cancel()
    await asyncio.gather(*attacks, *runs.values(), return_exceptions=True)
    for s in sites:
        s.ep.close()
    ctx.term()
    return {"times": sorted(t for s in sites if s.name.startswith("good-") for t in s.times), "sent": sent}


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("nice"):
        os.nice(spec["nice"])
    result = asyncio.run(_worker(spec))
    Path(spec["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    worker_main(sys.argv[1])
