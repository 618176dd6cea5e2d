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

``clock="simulated"`` runs the federation on a simulated clock instead (``fedbus.recipes.simtime``): the real
broker on an event loop whose time jumps to the next event and never sleeps, the sites as records (10,000 cost
a record each) trained by a pool of ``num_threads`` workers (or the ``pool`` given), each task taking
``train_s x`` the site's speed factor of simulated time (``train_s=None``: its measured compute time instead)
plus its model's transfer both ways over the site's ``bandwidth`` (bytes per simulated second: one number, or
one per site). ``availability`` (an :class:`Availability`) makes sites come and go. With a modelled
``train_s``, a run is reproducible: the same recipe and ``seed`` give the same decisions and the same model.
Where the workers train: ``gpus`` (``"auto"``: every visible CUDA device, or the CPU threads when there is none;
a number of devices, or a list of device indices) puts ``workers_per_gpu`` worker threads on each device
(``simtime.gpu``); ``ray`` (a Ray address, or ``"auto"``) trains on Ray actors instead (``simtime.ray_pool``):
``num_threads`` actors of one CPU each, or with ``gpus`` (a number of devices), ``workers_per_gpu`` actors per
device, each reserving that fraction of a GPU. A ``pool`` given is the caller's: used, not closed.

FLARE's arguments: ``clients`` names the sites (default ``site-1`` ... ``site-N``), ``workspace_root`` is
``workspace`` under FLARE's name, ``log_config`` sets the level of fedbus's logs for the run (FLARE's
``concise`` / ``full`` / ``verbose``, a level name, or a JSON logging config file whose root level is
taken). A job with ``[client] external_process = true`` has its scripts run as child processes
(``_launch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import torch

from fedbus import log as fedbus_log
from fedbus.broker import Broker
from fedbus.config import BrokerConfig, SiteConfig, is_safe_name
from fedbus.errors import ConfigError
from fedbus.recipes._driver import execute
from fedbus.recipes._he_keys import HEKeys, execution_keys, wants_he
from fedbus.recipes._launch import SimLauncher
from fedbus.recipes._threads import ScriptImports, ThreadLauncher
from fedbus.recipes.simtime.availability import Availability
from fedbus.recipes.simtime.backend import SimTimeBackend
from fedbus.recipes.simtime.host import SiteRecord
from fedbus.recipes.simtime.loop import SimClock
from fedbus.recipes.simtime.pool import WorkerPool
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


LOG_MODES = {"concise": "warning", "full": "info", "verbose": "debug"}
"""FLARE's log_config modes as the level of fedbus's own logs."""


def log_level(log_config: str | os.PathLike[str] | None) -> str | None:
    """The structlog level ``log_config`` stands for (None: leave logging as it is), or ConfigError."""
    if log_config is None:
        return None
    levels = logging.getLevelNamesMapping()
    text = os.fspath(log_config)
    if not isinstance(text, str):
        raise ConfigError(f"log_config must be a string, got {type(log_config).__name__}")
    if text.lower() in LOG_MODES:
        return LOG_MODES[text.lower()]
    if text.upper() in levels and text.upper() not in ("NOTSET", "WARN", "FATAL"):
        return text.lower()
    path = Path(text)
    if not path.is_file():
        modes = ", ".join([*LOG_MODES, "debug", "info", "warning", "error", "critical"])
        raise ConfigError(f"log_config: {text!r} is not one of {modes}, nor a logging config file")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        level = str(config["root"]["level"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"log_config: {path} is not a JSON logging config with a root level: {exc}") from exc
    if level.upper() not in levels:
        raise ConfigError(f"log_config: {path}: unknown root level {level!r}")
    return level.lower()


def _site_names(num_clients: int, clients: Any) -> list[str]:
    """The simulated sites' names: ``clients``, or site-1 ... site-N."""
    if clients is None:
        _positive_int("num_clients", num_clients)
        return [f"site-{i + 1}" for i in range(num_clients)]
    if isinstance(clients, str) or not all(is_safe_name(c) for c in clients):
        raise ConfigError(f"clients must be a list of site names ([A-Za-z0-9_.-]), got {clients!r}")
    names = list(clients)
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"clients must name at least one site, each once, got {names!r}")
    if num_clients not in (0, None, len(names)):
        raise ConfigError(f"num_clients={num_clients} but clients names {len(names)} sites")
    return names


class SimEnv:
    """Run a recipe with ``num_clients`` simulated sites in this process (see the module docstring)."""

    poll_s = 0.05

    def __init__(
        self,
        num_clients: int = 0,
        num_threads: int | None = None,
        workspace: str | os.PathLike[str] | None = None,
        speed: SpeedProfile | None = None,
        progress: Any = None,
        *,
        clients: list[str] | None = None,
        workspace_root: str | os.PathLike[str] | None = None,
        log_config: str | os.PathLike[str] | None = None,
        clock: str = "real",
        train_s: float | None = 1.0,
        bandwidth: float | Sequence[float] | None = None,
        availability: Availability | None = None,
        seed: int = 0,
        pool: WorkerPool | None = None,
        gpus: int | Sequence[int] | str | None = None,
        workers_per_gpu: int = 4,
        ray: str | None = None,
    ) -> None:
        if clock not in ("real", "simulated"):
            raise ConfigError(f"clock must be 'real' or 'simulated', got {clock!r}")
        self.clock = clock
        self.clients = _site_names(num_clients, clients)
        self.num_clients = len(self.clients)
        self.num_threads = _positive_int("num_threads", num_threads or os.cpu_count() or 1)
        if workspace is not None and workspace_root is not None:
            raise ConfigError("give workspace or workspace_root (the same thing), not both")
        workspace = workspace if workspace is not None else workspace_root
        self.workspace = Path(workspace) if workspace is not None else None
        self.log_level = log_level(log_config)
        if speed is not None and not isinstance(speed, SpeedProfile):
            raise ConfigError(f"speed must be a SpeedProfile, got {type(speed).__name__}")
        self.speed = speed
        self.factors = speed.factors(self.num_clients) if speed is not None else None
        self.progress = progress
        if train_s is not None and not (isinstance(train_s, int | float) and math.isfinite(train_s) and train_s >= 0):
            raise ConfigError(f"train_s must be a number of seconds >= 0 or None (measured), got {train_s!r}")
        self.train_s = train_s
        self.bandwidths = _bandwidths(bandwidth, self.num_clients)
        if availability is not None and not isinstance(availability, Availability):
            raise ConfigError(f"availability must be an Availability, got {type(availability).__name__}")
        self.availability = availability
        self.seed = int(seed)
        self.pool = pool
        self.gpus = _gpus(gpus, ray)
        self.workers_per_gpu = _positive_int("workers_per_gpu", workers_per_gpu)
        if ray is not None and (not isinstance(ray, str) or not ray):
            raise ConfigError(f"ray must be a Ray address or 'auto', got {ray!r}")
        self.ray = ray
        if pool is not None and (gpus is not None or ray is not None):
            raise ConfigError("give a pool, or gpus / ray for SimEnv to make one, not both")
        self._clock: SimClock | None = None
        chosen = (availability, pool, bandwidth, gpus, ray)
        if clock == "real" and any(v is not None for v in chosen):
            raise ConfigError("availability, bandwidth, pool, gpus and ray need clock='simulated'")

    def execute(self, recipe: Recipe, wait: bool = True) -> Run:
        workspace = self.workspace or Path(tempfile.mkdtemp(prefix="fedbus-sim-"))
        if self.clock == "simulated":
            _check_simulable(recipe)
            return execute(self._simulated(workspace), recipe, wait=wait, progress=self.progress)
        backend = _SimBackend(self, workspace, execution_keys(recipe, workspace))
        return execute(backend, recipe, wait=wait, progress=self.progress)

    def sim_now(self) -> float:
        """Simulated seconds of the current (or last) simulated run, 0 before one; safe from any thread."""
        return self._clock.now if self._clock is not None else 0.0

    def _simulated(self, workspace: Path) -> SimTimeBackend:
        factors = self.factors or [1.0] * self.num_clients
        sites = [
            SiteRecord(name, i, speed=factors[i], bandwidth=self.bandwidths[i]) for i, name in enumerate(self.clients)
        ]
        events = self.availability.events(self.clients) if self.availability is not None else []
        backend = SimTimeBackend(
            workspace,
            sites,
            pool=self.pool or self._make_pool(),
            own_pool=self.pool is None,
            workers=self.num_threads,
            seed=self.seed,
            train_s=self.train_s,
            availability=events,
        )
        self._clock = backend.clock
        return backend

    def _make_pool(self) -> WorkerPool | None:
        """The pool ``gpus`` / ``ray`` ask for (None: the backend's CPU threads)."""
        if self.ray is not None:
            from fedbus.recipes.simtime.ray_pool import RayPool

            if self.gpus is None:
                return RayPool(self.ray, self.num_threads, num_cpus=1)
            count = self.gpus if isinstance(self.gpus, int) else len(self.gpus)
            return RayPool(self.ray, count * self.workers_per_gpu, num_cpus=1, num_gpus=1 / self.workers_per_gpu)
        if self.gpus is None or (self.gpus == "auto" and not torch.cuda.is_available()):
            return None
        from fedbus.recipes.simtime.gpu import GpuWorkerPool

        return GpuWorkerPool("all" if self.gpus == "auto" else self.gpus, self.workers_per_gpu)

    def __repr__(self) -> str:
        shown = self.clients if len(self.clients) <= 10 else f"{len(self.clients)} sites"
        return f"SimEnv(clients={shown}, num_threads={self.num_threads}, speed={self.speed!r}, clock={self.clock!r})"


def _check_simulable(recipe: Recipe) -> None:
    """ConfigError for a job the simulated clock does not model: homomorphic encryption and secure aggregation
    change no decision of the strategy (their sums equal the plaintext ones within CKKS / fixed-point precision)
    but cost real cryptography per update (about a CPU second per million values); the job's DP and exclusion
    filters do change the model, and run on the simulated sites as on real ones."""
    if wants_he(recipe):
        raise ConfigError(
            "clock='simulated' does not simulate homomorphic encryption ([extra.privacy] he): simulate the "
            "plaintext job (the same sums within CKKS precision), or run it with clock='real' or in PocEnv"
        )
    if "secure_aggregation" in recipe.strategy_args:
        raise ConfigError(
            "clock='simulated' does not simulate secure aggregation: simulate the plaintext job (the same sum "
            "within the fixed-point precision), or run it with clock='real' or in PocEnv"
        )


def _gpus(gpus: Any, ray: str | None) -> int | list[int] | str | None:
    """``gpus`` checked: None, "auto", a number of devices >= 1, or (not with Ray) a list of device indices."""
    if gpus is None or gpus == "auto":
        if gpus == "auto" and ray is not None:
            raise ConfigError("with ray, gpus is the number of GPUs the actors share (Ray places them), not 'auto'")
        return gpus
    from fedbus.recipes.simtime.gpu import check_gpus

    checked = check_gpus(gpus)
    if checked == "all" or (ray is not None and not isinstance(checked, int)):
        raise ConfigError(f"gpus must be 'auto', a number of devices or (without ray) device indices, got {gpus!r}")
    return checked


def _bandwidths(bandwidth: Any, n: int) -> list[float | None]:
    """Per-site bandwidth in bytes per simulated second (None: transfers take no time)."""
    if bandwidth is None:
        return [None] * n
    values = [bandwidth] * n if isinstance(bandwidth, int | float) else list(bandwidth)
    if len(values) != n or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values
    ):
        raise ConfigError(f"bandwidth must be a number > 0 or one per site ({n}), got {bandwidth!r}")
    return [float(v) for v in values]


class _SimBackend:
    """The broker and the sites of one execution, on the execution's loop."""

    expected_sites: int | None

    def __init__(self, env: SimEnv, workspace: Path, he_keys: HEKeys | None = None) -> None:
        self.env = env
        self.workspace = workspace
        self.he_keys = he_keys
        self.expected_sites = env.num_clients
        self.poll_s = env.poll_s
        self.broker: Broker | None = None
        self.sites: list[Site] = []
        self.records: list[dict[str, Any]] = []
        self.imports = ScriptImports()
        self.threads = ThreadLauncher(threading.Semaphore(env.num_threads), self.imports)
        omp = max(1, (os.cpu_count() or 1) // min(env.num_threads, env.num_clients))
        self.launcher = SimLauncher(self.threads, omp)
        self._torch_threads: int | None = None
        self._log_config: dict[str, Any] | None = None

    async def start(self, ctx: Context) -> str:
        if self.env.log_level is not None:
            self._log_config = structlog.get_config()
            fedbus_log.configure(level=self.env.log_level)
        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // min(self.env.num_threads, self.env.num_clients)))
        address = f"inproc://fedbus-sim-{secrets.token_hex(6)}"
        # durability "none": the whole federation lives in this process, so a crash ends the run whatever is on
        # disk; the checkpoints are still written (the run's results), only not fsynced.
        he = self.he_keys
        cfg = BrokerConfig(
            bind=address,
            workspace=str(self.workspace / "broker"),
            heartbeat_s=1.0,
            liveness=10,
            durability="none",
            he_context=str(he.broker) if he is not None else None,
        )
        self.broker = Broker(cfg, ctx=ctx)
        await self.broker.__aenter__()
        factors: list[float | None] = [None] * self.env.num_clients
        if self.env.factors is not None:
            factors = list(self.env.factors)
        for name, factor in zip(self.env.clients, factors, strict=True):
            site_cfg = SiteConfig(
                name=name,
                broker=address,
                workspace=str(self.workspace / name),
                heartbeat_s=1.0,
                he_context=str(he.site) if he is not None else None,
            )
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
        await asyncio.to_thread(self.threads.join, 5.0)
        self._restore()

    def kill(self) -> None:
        self.launcher.kill()
        self._restore()

    def watch(self) -> None:
        pass

    def _restore(self) -> None:
        if self._log_config is not None:
            config, self._log_config = self._log_config, None
            structlog.configure(**config)
        self.imports.restore()
        if self._torch_threads is not None:
            with contextlib.suppress(RuntimeError):
                torch.set_num_threads(self._torch_threads)
            self._torch_threads = None

    def checkpoint_dir(self, job_id: str) -> Path | None:
        return self.workspace / "broker" / "jobs" / job_id / "models"

    def result_dir(self, job_id: str) -> Path | None:
        return self.workspace / "broker" / "jobs" / job_id

    def task_records(self, job_id: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("job_id") == job_id]
