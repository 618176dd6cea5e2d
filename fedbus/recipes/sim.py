"""SimEnv: a whole federation in this process, for trying a recipe before any machine is involved.

The broker and ``num_clients`` site daemons run on one asyncio loop in a background thread and talk over
``inproc://`` sockets of one shared ZeroMQ context: no ports, no processes, the real daemons and the real
protocol (model streams, checkpoints, the job store), so a recipe that works here only changes its
transport in PocEnv and ProdEnv. Each site's training script runs as a thread of this process (see
``_threads``); ``num_threads`` caps how many train at once (default: the number of cores), and torch's
intra-op threads are divided among them for the run (restored afterwards).

``speed`` (a :class:`SpeedProfile`) makes some sites stragglers: each site holds its results back by
``(f_i - 1) x`` its measured training time. That is implemented in the site runner, behind a setting
only SimEnv sets, so the hold-back travels through the same code as a real result.

Each execution gets its own folder under ``workspace`` (``jobs/NAME-N`` for the exported job, ``broker``
and ``site-I`` for the daemons, ``results/JOB`` for the download); without a workspace, a new temporary
folder is made and kept, since the run's checkpoints live there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedbus.broker import Broker
from fedbus.config import BrokerConfig, SiteConfig
from fedbus.errors import ConfigError
from fedbus.recipes._driver import execute
from fedbus.recipes._threads import ScriptImports, ThreadLauncher
from fedbus.recipes.speed import SpeedProfile
from fedbus.site import Site
from fedbus.transport.context import Context

if TYPE_CHECKING:
    from fedbus.recipes.recipe import Recipe
    from fedbus.recipes.run import Run


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class SimEnv:
    """Run a recipe with ``num_clients`` simulated sites in this process (see the module docstring)."""

    poll_s = 0.05

    def __init__(
        self,
        num_clients: int,
        num_threads: int | None = None,
        workspace: str | os.PathLike[str] | None = None,
        speed: SpeedProfile | None = None,
        progress: Any = None,
    ) -> None:
        self.num_clients = _positive_int("num_clients", num_clients)
        self.num_threads = _positive_int("num_threads", num_threads or os.cpu_count() or 1)
        self.workspace = Path(workspace) if workspace is not None else None
        if speed is not None and not isinstance(speed, SpeedProfile):
            raise ConfigError(f"speed must be a SpeedProfile, got {type(speed).__name__}")
        self.speed = speed
        self.factors = speed.factors(self.num_clients) if speed is not None else None
        self.progress = progress

    def execute(self, recipe: Recipe, wait: bool = True) -> Run:
        workspace = self.workspace or Path(tempfile.mkdtemp(prefix="fedbus-sim-"))
        return execute(_SimBackend(self, workspace), recipe, wait=wait, progress=self.progress)

    def __repr__(self) -> str:
        return f"SimEnv(num_clients={self.num_clients}, num_threads={self.num_threads}, speed={self.speed!r})"


class _SimBackend:
    """The broker and the sites of one execution, on the execution's loop."""

    expected_sites: int | None

    def __init__(self, env: SimEnv, workspace: Path) -> None:
        self.env = env
        self.workspace = workspace
        self.expected_sites = env.num_clients
        self.poll_s = env.poll_s
        self.broker: Broker | None = None
        self.sites: list[Site] = []
        self.records: list[dict[str, Any]] = []
        self.imports = ScriptImports()
        self.launcher = ThreadLauncher(threading.Semaphore(env.num_threads), self.imports)
        self._torch_threads: int | None = None

    async def start(self, ctx: Context) -> str:
        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // min(self.env.num_threads, self.env.num_clients)))
        address = f"inproc://fedbus-sim-{secrets.token_hex(6)}"
        cfg = BrokerConfig(bind=address, workspace=str(self.workspace / "broker"), heartbeat_s=1.0, liveness=10)
        self.broker = Broker(cfg, ctx=ctx)
        await self.broker.__aenter__()
        factors: list[float | None] = [None] * self.env.num_clients
        if self.env.factors is not None:
            factors = list(self.env.factors)
        for i, factor in enumerate(factors):
            name = f"site-{i + 1}"
            site_cfg = SiteConfig(name=name, broker=address, workspace=str(self.workspace / name), heartbeat_s=1.0)
            site = Site(
                site_cfg,
                ctx=ctx,
                end_grace_s=5.0,
                kill_after_s=2.0,
                shutdown_timeout_s=15.0,
                launcher=self.launcher,
                speed_factor=factor,
                observer=self.records.append,
            )
            await site.__aenter__()
            self.sites.append(site)
        return address

    async def stop(self) -> None:
        sites, self.sites = self.sites, []
        for result in await asyncio.gather(*(s.__aexit__() for s in sites), return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result
        if self.broker is not None:
            broker, self.broker = self.broker, None
            await broker.__aexit__()
        await asyncio.to_thread(self.launcher.join, 5.0)
        self._restore()

    def kill(self) -> None:
        self._restore()

    def watch(self) -> None:
        pass

    def _restore(self) -> None:
        self.imports.restore()
        if self._torch_threads is not None:
            with contextlib.suppress(RuntimeError):
                torch.set_num_threads(self._torch_threads)
            self._torch_threads = None

    def checkpoint_dir(self, job_id: str) -> Path | None:
        return self.workspace / "broker" / "jobs" / job_id / "models"

    def task_records(self, job_id: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("job_id") == job_id]
