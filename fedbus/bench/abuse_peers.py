"""The peers of ``fedbus bench abuse`` (``fedbus.bench.abuse``), each kind in a worker process of its own.

* ``TimedSite``: a good site (``fedbus.bench.scale.SimSite``: the real protocol, an instant DIFF answer to every
  task) that notes when each of its updates was acknowledged.
* ``Insider``: an attacker that is a site of the job: it behaves until its attack starts, then floods job events
  (``bytes``) or takes upload credit and sends no chunk (``slowloris``), and leaves without a word at the end.
* ``_outsider``: an attacker from outside the job (``refused``, ``reconnect``, ``nonreading``) on a DEALER
  endpoint of its own that it reads, or not, exactly as it means to.

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

from fedbus.bench.scale import SimSite
from fedbus.errors import FedbusError
from fedbus.modelio import serde
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.envelope import encode
from fedbus.protocol.messages import Chunk, Credit, Heartbeat, Hello, JobEvent, Task
from fedbus.security import ClientKeys
from fedbus.transport.context import Context
from fedbus.transport.endpoint import DealerEndpoint

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


async def _blast(ep: DealerEndpoint, frames: list[bytes], until: float, *, read: bool) -> int:
    """Send ``frames`` over and over until ``until`` (a full queue waits, bounded by ``until``); ``read``: take
    what the broker answers, else leave it unread. Returns how many messages went."""
    sent = 0
    reader = asyncio.ensure_future(_drain(ep)) if read else None
    try:
        async with asyncio.timeout(max(0.0, until - time.time())):  # one deadline: cheaper than one per send
            while True:
                try:
                    await ep.send_raw(frames)
                except FedbusError:
                    await asyncio.sleep(0.001)
                    continue
                sent += 1
                if sent % 256 == 0:
                    await asyncio.sleep(0)  # the worker's other peers get their turn
    except TimeoutError:
        pass
    finally:
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    return sent


async def _drain(ep: DealerEndpoint) -> None:
    while True:
        with contextlib.suppress(FedbusError):
            await ep.recv()


async def _outsider(kind: str, address: str, name: str, keys: ClientKeys | None, ctx: Context, until: float) -> int:
    """One attacker from outside the job until ``until``; returns the messages (or cycles) it sent."""
    token = keys.routing_token() if keys else secrets.token_hex(6)
    curve = keys.as_tuple() if keys else None
    if kind == "reconnect":  # connect, hello, disconnect
        cycles = 0
        while time.time() < until:
            ep = DealerEndpoint.connect(ctx, address, identity=f"site:{name}:{token}".encode(), curve=curve)
            with contextlib.suppress(TimeoutError, FedbusError):
                await asyncio.wait_for(ep.send(b"", Hello(role="site", name=name, session=secrets.token_hex(8))), 1)
                cycles += 1
            await asyncio.sleep(0.02)
            ep.close()
        return cycles
    if kind == "refused":  # with keys: not the key's own routing id; without: garbage before hello
        ep = DealerEndpoint.connect(ctx, address, identity=f"site:not-{name}:{token}".encode(), curve=curve)
        frame = encode(Heartbeat()) if keys else b"\xc1garbage" + os.urandom(32)
        sent = await _blast(ep, [frame], until, read=True)
    else:  # nonreading: stream messages before any hello, never reading
        ep = DealerEndpoint.connect(ctx, address, curve=curve)
        sent = await _blast(ep, [encode(Credit(sid=1, until=0))], until, read=False)
    ep.close()
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
        peers = [asyncio.ensure_future(_outsider(kind, address, n, keys_of(kits, n), ctx, end)) for n in names]
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
