"""PocEnv: the real daemons as local processes; ProdEnv: a broker that is already running elsewhere.

PocEnv starts ``python -m fedbus.cli broker`` on a free loopback port and, at the same time, ``num_clients``
site daemons, each in its own process group (``start_new_session``) with its log in the workspace, then submits,
follows and downloads through ``fedbus.admin.Admin`` like any operator would. The children get
``OMP_NUM_THREADS = max(1, cores // num_clients)`` unless the caller set it, so N sites' training scripts
do not fight over the cores.

Stopping is the point of this module: after success, after failure and after a KeyboardInterrupt, no
process may be left. The daemons get SIGTERM (a site ends its scripts: end_job, grace, TERM, KILL);
whatever is still alive after the grace period is SIGKILLed by process group, and then every
process that was ever a descendant of ours (training scripts run in sessions of their own, so a group
kill alone would miss them) is SIGKILLed by PID. An ``atexit`` hook does the same for a program that
leaves without waiting for its run.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from fedbus.admin import from_kit
from fedbus.errors import ConfigError, JobError
from fedbus.recipes._driver import execute
from fedbus.recipes._he_keys import HEKeys, execution_keys
from fedbus.recipes.sim import _site_names
from fedbus.toml_writer import dumps_toml
from fedbus.transport.context import Context

if TYPE_CHECKING:
    from fedbus.recipes.recipe import Recipe
    from fedbus.recipes.run import Run

BROKER_TOML = """# written by fedbus.recipes.PocEnv: the poc profile on a free loopback port
bind = "{address}"
workspace = "{workspace}"
heartbeat_s = 0.5
liveness = 4
"""


class PocEnv:
    """Run a recipe on a broker and ``num_clients`` site daemons started here as processes."""

    poll_s = 0.2

    def __init__(
        self,
        num_clients: int = 2,
        workspace: str | os.PathLike[str] | None = None,
        progress: Any = None,
        *,
        clients: list[str] | None = None,
    ) -> None:
        self.clients = _site_names(0 if clients is not None else num_clients, clients)
        if "broker" in self.clients:
            raise ConfigError("clients: 'broker' names the broker's log here; call the site something else")
        self.num_clients = len(self.clients)
        self.workspace = Path(workspace) if workspace is not None else None
        self.progress = progress

    def execute(self, recipe: Recipe, wait: bool = True) -> Run:
        workspace = (self.workspace or Path(tempfile.mkdtemp(prefix="fedbus-poc-"))).resolve()
        backend = _PocBackend(self.clients, workspace, execution_keys(recipe, workspace))
        return execute(backend, recipe, wait=wait, progress=self.progress)

    def __repr__(self) -> str:
        return f"PocEnv(clients={self.clients})"


class ProdEnv:
    """Submit a recipe to a running broker, follow it, download its results.

    ``kit`` is an admin startup kit (a folder with ``admin.toml``, written by ``fedbus provision``): the
    broker's address comes from it (unless ``broker`` is given) and the connection is CurveZMQ with the
    kit's keys. ``credentials`` is the older name of the same argument, ``startup_kit_location`` FLARE's.
    """

    poll_s = 1.0

    def __init__(
        self,
        broker: str | None = None,
        workspace: str | os.PathLike[str] | None = None,
        credentials: Any = None,
        progress: Any = None,
        kit: str | os.PathLike[str] | None = None,
        *,
        startup_kit_location: str | os.PathLike[str] | None = None,
    ) -> None:
        given = [k for k in (kit, credentials, startup_kit_location) if k is not None]
        if len(given) > 1:
            raise ConfigError("give the admin kit once: kit, startup_kit_location or credentials")
        kit = given[0] if given else None
        self.admin_options: dict[str, Any] = {}
        if kit is not None:
            if not isinstance(kit, str | os.PathLike):
                raise ConfigError(f"kit must be the path of an admin startup kit, got {type(kit).__name__}")
            admin = from_kit(kit)
            broker = broker or admin.address
            self.admin_options = {"keys": admin.keys, "name": admin.name}
        broker = broker or "tcp://127.0.0.1:7788"
        if not isinstance(broker, str) or not broker.startswith(("tcp://", "ipc://")):
            raise ConfigError(f"broker must be a tcp:// or ipc:// address, got {broker!r}")
        self.broker = broker
        self.workspace = Path(workspace) if workspace is not None else None
        self.credentials = self.kit = kit
        self.progress = progress

    def execute(self, recipe: Recipe, wait: bool = True) -> Run:
        workspace = (self.workspace or Path(tempfile.mkdtemp(prefix="fedbus-prod-"))).resolve()
        backend = _ProdBackend(self.broker, workspace, self.poll_s, self.admin_options)
        return execute(backend, recipe, wait=wait, progress=self.progress)

    def __repr__(self) -> str:
        return f"ProdEnv(broker={self.broker!r})"


class _ProdBackend:
    """Nothing to start or stop: the broker and the sites belong to someone else."""

    expected_sites: int | None = None

    def __init__(self, address: str, workspace: Path, poll_s: float, admin_options: dict[str, Any]) -> None:
        self.address = address
        self.workspace = workspace
        self.poll_s = poll_s
        self.admin_options = admin_options  # keys and name from an admin kit, for the Admin connection

    async def start(self, ctx: Context) -> str:
        return self.address

    async def stop(self) -> None:
        pass

    def kill(self) -> None:
        pass

    def checkpoint_dir(self, job_id: str) -> Path | None:
        return None

    def result_dir(self, job_id: str) -> Path | None:
        return None

    def watch(self) -> None:
        pass

    def task_records(self, job_id: str) -> list[dict[str, Any]]:
        return []


class _PocBackend:
    """The daemon processes of one execution."""

    def __init__(self, clients: list[str], workspace: Path, he_keys: HEKeys | None = None) -> None:
        self.clients = clients
        self.he_keys = he_keys
        self.num_clients = num_clients = len(clients)
        self.workspace = workspace
        self.expected_sites: int | None = num_clients
        self.poll_s = PocEnv.poll_s
        self.procs: list[subprocess.Popen[bytes]] = []
        self.seen: dict[int, psutil.Process] = {}  # every descendant ever seen, by PID
        self.closed = False
        atexit.register(self.kill)

    # --- starting ------------------------------------------------------------------------------------

    async def start(self, ctx: Context) -> str:
        return await asyncio.to_thread(self._start)

    def _start(self) -> str:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.num_clients)))
        env["PYTHONUNBUFFERED"] = "1"
        src = str(Path(__file__).resolve().parents[2])  # the folder holding fedbus/: a source tree works too
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        config, log_path = self.workspace / "broker.toml", self.workspace / "broker.log"
        for _ in range(3):
            # A free port picked here lets the sites start with the broker (each process spends seconds
            # importing torch) instead of after it; the sites dial until the broker listens.
            address = f"tcp://127.0.0.1:{_free_port()}"
            profile = BROKER_TOML.format(address=address, workspace=self.workspace / "broker")
            if self.he_keys is not None:
                profile += dumps_toml({"he_context": str(self.he_keys.broker)})
            config.write_text(profile)
            offset = log_path.stat().st_size if log_path.exists() else 0
            broker = self._spawn(["broker", "--config", str(config)], "broker", env)
            for name in self.clients:
                args = ["site", "--name", name, "--broker", address, "--workspace", str(self.workspace / name)]
                if self.he_keys is not None:  # the context is a config file's key only (a path checked as one)
                    site_toml = self.workspace / f"{name}.toml"
                    site_toml.write_text(dumps_toml({"he_context": str(self.he_keys.site)}))
                    args += ["--config", str(site_toml)]
                self._spawn(args, name, env)
            if self._listening(broker, log_path, offset):
                return address
            self._stop(0.0)  # someone took the port in between: start over on another one
            self.procs, self.closed = [], False
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        raise JobError(f"the broker did not start (see {log_path}):\n{tail}")

    def _spawn(self, args: list[str], name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        if self.closed:
            raise JobError("the environment was stopped while it was starting")
        with open(self.workspace / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedbus.cli", *args, "--log-json"],
                cwd=self.workspace,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # our own group to kill; a Ctrl-C at the terminal is ours to handle
            )
        self.procs.append(proc)
        return proc

    def _listening(self, broker: subprocess.Popen[bytes], log_path: Path, offset: int, timeout: float = 60.0) -> bool:
        """True once the broker logged "broker listening"; False if it exited first (or did not start)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(rec.get("event") == "broker listening" for rec in read_json_lines(log_path, offset)):
                return True
            if broker.poll() is not None:
                return False
            time.sleep(0.05)
        return False

    # --- stopping ------------------------------------------------------------------------------------

    async def stop(self) -> None:
        await asyncio.to_thread(self._stop, 15.0)
        atexit.unregister(self.kill)

    def kill(self) -> None:
        self._stop(0.0)

    def watch(self) -> None:
        self._remember_descendants()

    def _stop(self, grace: float) -> None:
        self.closed = True
        self._remember_descendants()
        for p in self.procs:  # all at once: the job is over, and a site's bye to a gone broker costs nothing
            _signal_group(p, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        deadline = time.monotonic() + grace
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            _signal_group(p, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5.0)
        for proc in self.seen.values():  # scripts run in their own sessions: by PID, not by group
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(list(self.seen.values()), timeout=5.0)

    def _remember_descendants(self) -> None:
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(p.pid).children(recursive=True):
                    self.seen.setdefault(child.pid, child)

    def pids(self) -> list[int]:
        """The PIDs of the daemons and of their descendants now alive (tests check they are all gone)."""
        self._remember_descendants()
        return [p.pid for p in self.procs] + list(self.seen)

    # --- results -------------------------------------------------------------------------------------

    def checkpoint_dir(self, job_id: str) -> Path | None:
        return self.workspace / "broker" / "jobs" / job_id / "models"

    def result_dir(self, job_id: str) -> Path | None:
        return self.workspace / "broker" / "jobs" / job_id

    def task_records(self, job_id: str) -> list[dict[str, Any]]:
        """The sites' "result delivered" log lines for this job (the same record SimEnv's observer gets)."""
        keys = ("site", "job_id", "task_id", "kind", "version", "params_bytes", "train_s", "sim_delay_s", "received_at")
        out = []
        for name in self.clients:
            for rec in read_json_lines(self.workspace / f"{name}.log"):
                if rec.get("event") == "result delivered" and rec.get("job") == job_id:  # daemons log "job"
                    out.append({k: rec.get("job" if k == "job_id" else k) for k in keys})
        return out


def _signal_group(p: subprocess.Popen[bytes], sig: int) -> None:
    if p.poll() is None or sig == signal.SIGKILL:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, sig)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_json_lines(path: Path, offset: int = 0) -> list[dict[str, Any]]:
    """The JSON objects of a ``--log-json`` log from byte ``offset`` on (other lines, e.g. tracebacks, skipped)."""
    out = []
    with contextlib.suppress(OSError), open(path, "rb") as f:
        f.seek(offset)
        for line in f:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
    return out
