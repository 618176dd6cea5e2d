"""Shared pieces of the security tests: provisioned kits, a secure broker in the test's loop, a TCP relay
that records every byte it forwards (the wire, as a packet capture would see it), a tiny job."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedbus.audit import read_audit
from fedbus.broker import Broker
from fedbus.config import BrokerConfig, SiteConfig
from fedbus.modelio import serde
from fedbus.provision import provision
from fedbus.security import ClientKeys
from fedbus.site import Site

PROJECT = """
name = "secure-test"
broker = "tcp://127.0.0.1:7788"
{revoked}
[[participant]]
name = "site-1"
role = "site"

[[participant]]
name = "site-2"
role = "site"

[[participant]]
name = "ops"
role = "admin"
"""

WAIT = 20.0


def make_kits(tmp: Path, revoked: tuple[str, ...] = ()) -> Path:
    """Provision (or re-provision) the test project into ``tmp/kits``."""
    project = tmp / "project.toml"
    line = "revoked = [" + ", ".join(f'"{n}"' for n in revoked) + "]" if revoked else ""
    project.write_text(PROJECT.format(revoked=line))
    provision(project, tmp / "kits")
    return tmp / "kits"


def keys(kits: Path, name: str) -> ClientKeys:
    return ClientKeys.load(kits / name / f"{name}.key_secret", kits / name / "broker.key")


def broker_config(tmp: Path, kits: Path, **opts: Any) -> BrokerConfig:
    return BrokerConfig(
        bind="tcp://127.0.0.1:0",
        workspace=str(tmp / "broker"),
        heartbeat_s=0.2,
        liveness=10,
        secret_key=str(kits / "broker" / "broker.key_secret"),
        participants=str(kits / "broker" / "participants.toml"),
        **opts,
    )


def site_config(tmp: Path, kits: Path, name: str, address: str, **opts: Any) -> SiteConfig:
    cfg = SiteConfig(
        name=name,
        broker=address,
        workspace=str(tmp / name),
        heartbeat_s=0.2,
        secret_key=str(kits / name / f"{name}.key_secret"),
        broker_key=str(kits / name / "broker.key"),
    )
    return replace(cfg, **opts) if opts else cfg


@contextlib.asynccontextmanager
async def secure_broker(tmp: Path, kits: Path, **opts: Any) -> AsyncIterator[Broker]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    async with Broker(broker_config(tmp, kits, **opts)) as broker:
        yield broker


async def until(cond: Any, timeout: float = WAIT, what: str = "condition") -> None:
    """Poll ``cond()`` (every 50 ms, bounded) until true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def audit_of(path: Path, kind: str | None = None) -> list[dict]:
    return [r for r in read_audit(path) if kind is None or r["kind"] == kind] if path.exists() else []


class Relay:
    """A TCP relay on 127.0.0.1 (ephemeral port) to ``target``: forwards both ways and keeps every byte."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.captured = bytearray()
        self.connections = 0  # accepted so far
        self.server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task] = set()

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"tcp://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> Relay:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for t in list(self._pipes):
            t.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(1 << 20):
                self.captured += data
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()


def patterned_model(n: int = 65536) -> dict[str, torch.Tensor]:
    """A model whose bytes are recognizable: no run of 64 bytes of it occurs by chance in other traffic."""
    g = torch.Generator().manual_seed(1234)
    return {"w": torch.randn(n, generator=g), "private": torch.zeros(16)}


def write_model(path: Path, model: dict[str, torch.Tensor]) -> None:
    serde.write_file(path, serde.layout(model))


SCRIPT = """
import fedbus.client as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    params = {k: v + 1 for k, v in model.params.items()}
    params["private"] = params["private"] + 7777.0   # what this site must never let out
    flare.send(flare.FLModel(params=params, metrics={"loss": 1.0}, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""


def write_job(folder: Path, model: dict[str, torch.Tensor], *, rounds: int = 2, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "client.py").write_text(SCRIPT)
    write_model(folder / "model.safetensors", model)
    (folder / "job.toml").write_text(
        'name = "sec"\nmodel = "model.safetensors"\n\n'
        f'[strategy]\nname = "fedavg"\nmin_clients = 2\nnum_rounds = {rounds}\n\n'
        '[script]\npath = "client.py"\n\n[sites]\nmin = 2\nmax = 2\n' + extra
    )
    return folder


__all__ = ["Site"]
