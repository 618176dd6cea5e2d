"""SimEnv's backend on simulated time: the real broker on a ``SimLoop``, the sites as records on a ``SiteHost``.

What runs for real: the broker (its registry, job store, checkpoints, controller and strategy, its stream
hub, its decoding and validation of every message), the recipe's driver (submit, status, download), the
job's script (in the worker pool). What is simulated: the clock (``SimLoop``), the sites' processes (records
on one ``SiteHost``), their network (an in-process hub instead of sockets) and their devices (training time
from the speed profile, transfer time from the bandwidth).

Heartbeats: simulated sites never fall silent by accident, so the broker is given a long heartbeat (the
liveness sweep is a loop timer on the simulated clock, and a short period would only add events); sites
that go away say bye (``availability``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedbus.broker import Broker
from fedbus.config import BrokerConfig
from fedbus.recipes._threads import ScriptImports
from fedbus.recipes.simtime.host import SiteHost, SiteRecord
from fedbus.recipes.simtime.loop import SimClock, SimLoop
from fedbus.recipes.simtime.pool import ThreadWorkerPool, WorkerPool
from fedbus.recipes.simtime.wire import SimBrokerEndpoint
from fedbus.transport.context import Context
from fedbus.transport.memory import MemoryHub

HEARTBEAT_S = 3600.0
POLL_S = 600.0
"""Simulated seconds between the recipe's status polls. A poll costs no simulated time, and waiting for the next
one after the job ended costs no wall time (the clock jumps), but each costs a status reply that lists every
site of the job: few, long intervals."""


class SimTimeBackend:
    """The ``Backend`` of a simulated-time execution (``fedbus.recipes._driver``)."""

    expected_sites: int | None

    def __init__(
        self,
        workspace: Path,
        sites: Sequence[SiteRecord],
        *,
        pool: WorkerPool | None = None,
        own_pool: bool = True,
        workers: int = 1,
        seed: int = 0,
        train_s: float | None = 1.0,
        availability: Sequence[tuple[float, int, bool]] = (),
    ) -> None:
        self.workspace = workspace
        self.sites = list(sites)
        self.expected_sites = len(self.sites)
        self.poll_s = POLL_S
        self.clock = SimClock()
        self.pool = pool if pool is not None else ThreadWorkerPool(workers)
        self.own_pool = own_pool or pool is None  # a pool the caller made is the caller's to close (and reuse)
        self.seed = seed
        self.train_s = train_s
        self.availability = list(availability)
        self.records: list[dict[str, Any]] = []
        self.imports = ScriptImports()
        self.broker: Broker | None = None
        self.host: SiteHost | None = None
        self._torch: int | None = None
        self._rng: torch.Tensor | None = None
        self.admin_options = {"timeout": 1e6}  # simulated seconds: a request never times out in a jump

    def loop_factory(self) -> asyncio.AbstractEventLoop:
        return SimLoop(self.clock)

    async def start(self, ctx: Context) -> str:
        # One intra-op thread: results are then bit-identical whatever the number of workers (torch's CPU kernels
        # are deterministic for a given thread count), and small models train best that way.
        self._torch = torch.get_num_threads()
        torch.set_num_threads(1)
        self._rng = torch.get_rng_state()  # a one-thread pool seeds the global generator per task: given back at stop
        hub = MemoryHub()
        address = f"inproc://fedbus-simtime-{secrets.token_hex(6)}"
        cfg = BrokerConfig(
            bind=address,
            workspace=str(self.workspace / "broker"),
            heartbeat_s=HEARTBEAT_S,
            liveness=3,
            chunk_mb=64.0,
            max_requests_per_s=1e9,
            request_burst=10**9,
            durability="none",  # the workspace is the simulation's own, thrown away with it: no fsync
        )
        self.broker = Broker(cfg, ctx=ctx, endpoint_wrapper=lambda router: SimBrokerEndpoint(router, hub))
        await self.broker.__aenter__()
        self.host = SiteHost(
            hub,
            self.sites,
            self.pool,
            self.clock,
            workspace=self.workspace / "sites",
            seed=self.seed,
            train_s=self.train_s,
            availability=self.availability,
            observer=self.records.append,
            prepare=self.imports.prepare,
        )
        await self.host.start()
        return address

    async def stop(self) -> None:
        if self.host is not None:
            host, self.host = self.host, None
            await host.close()
        if self.broker is not None:
            broker, self.broker = self.broker, None
            await broker.__aexit__()
        if self.own_pool:
            await asyncio.to_thread(self.pool.close)
        self._restore()

    def kill(self) -> None:
        self._restore()

    def _restore(self) -> None:
        self.imports.restore()
        if self._rng is not None:
            state, self._rng = self._rng, None
            torch.set_rng_state(state)
        if self._torch is not None:
            threads, self._torch = self._torch, None
            with contextlib.suppress(RuntimeError):
                torch.set_num_threads(threads)

    def watch(self) -> None:
        pass

    def checkpoint_dir(self, job_id: str) -> Path | None:
        return self.workspace / "broker" / "jobs" / job_id / "models"

    def result_dir(self, job_id: str) -> Path | None:
        return self.workspace / "broker" / "jobs" / job_id

    def task_records(self, job_id: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("job_id") == job_id]


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)
