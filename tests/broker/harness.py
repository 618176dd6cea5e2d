"""An in-process federation for broker tests: a real Broker and real Site daemons on one event loop
(real zmq over ipc), whose training scripts are real child processes running a tiny job."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch

from fedbus.admin import Admin
from fedbus.broker import Broker
from fedbus.config import BrokerConfig, SiteConfig
from fedbus.modelio import serde
from fedbus.site import Site

SCRIPT = """
import sys, time
import torch
import fedbus.client as flare

mode = sys.argv[1] if len(sys.argv) > 1 else "ok"
flare.init()
bad = flare.get_site_name() == "site-3"
while flare.is_running():
    model = flare.receive()
    if flare.is_evaluate():
        flare.send(flare.FLModel(metrics={"score": float(model.params["w"].sum())}))
        continue
    params = {k: v + 1 for k, v in model.params.items()}
    if bad and mode == "crash":
        sys.exit(3)
    if bad and mode == "nan":
        params["w"][0] = float("nan")
    if bad and mode == "shape":
        params["w"] = torch.zeros(11)
    if bad and mode == "hang":
        time.sleep(3600)
    if mode == "slow":
        time.sleep(2.0 if bad else 0.2)
    flare.send(flare.FLModel(params=params, metrics={"loss": 1.0}, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""


def write_job(
    folder: Path, *, mode: str = "ok", min_clients: int = 3, rounds: int = 2, extra: str = "", strategy: str = ""
) -> Path:
    """A tiny job; ``strategy`` replaces the default FedAvg table body (e.g. a FedBuff one)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "client.py").write_text(SCRIPT)
    serde.write_file(folder / "model.safetensors", serde.layout({"w": torch.zeros(10)}))
    body = strategy or f'name = "fedavg"\nmin_clients = {min_clients}\nnum_rounds = {rounds}\n{extra}'
    (folder / "job.toml").write_text(
        f'name = "tiny"\nmodel = "model.safetensors"\n\n[strategy]\n{body}\n'
        f'[script]\npath = "client.py"\nargs = ["{mode}"]\n\n[sites]\nmin = 3\nmax = 3\n'
    )
    return folder


@contextlib.asynccontextmanager
async def federation(tmp: Path, sites: int = 3, **broker_opts: Any) -> AsyncIterator[tuple[Broker, list[Site], Admin]]:
    """``broker_opts`` are extra BrokerConfig keys (e.g. ``metrics_port``)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = BrokerConfig(
        bind=f"ipc://{tmp}/broker.sock", workspace=str(tmp / "broker"), heartbeat_s=0.5, liveness=10, **broker_opts
    )
    async with Broker(cfg) as broker:
        members = [
            Site(
                SiteConfig(
                    name=f"site-{i + 1}", broker=broker.address, workspace=str(tmp / f"s{i + 1}"), heartbeat_s=0.2
                )
            )
            for i in range(sites)
        ]
        async with contextlib.AsyncExitStack() as stack:
            for s in members:
                await stack.enter_async_context(s)
            async with Admin(broker.address) as admin:
                yield broker, members, admin


async def wait_job(admin: Admin, job_id: str, timeout: float = 60.0) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        job = (await admin.status(job_id))["jobs"][0]
        if job["state"] in ("finished", "failed", "aborted"):
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s")
