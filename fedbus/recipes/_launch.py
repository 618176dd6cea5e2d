"""SimEnv's launcher: each job's script as a thread of this process, or as a child process when the job
says ``[client] external_process = true`` (FLARE's ``launch_external_process=True``).

Why both: a thread costs nothing to start and suits most simulations (see ``_threads``); a child process
isolates a script that must own its process (global state, signal handlers, a CUDA context, a library that
is not thread-safe) and is what PocEnv and production do anyway. The choice is the job's, read from the
job.toml the site just unpacked into the script's working folder; a child is the site daemon's own
:class:`fedbus.site.child.ScriptProcess`, the same launcher PocEnv's sites use. Children are not held to
``num_threads`` (that caps the threads); they get ``OMP_NUM_THREADS`` so that N of them share the cores.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedbus.jobs import JOB_TOML, parse_job_toml
from fedbus.recipes._threads import ScriptThread, ThreadLauncher
from fedbus.site.child import ScriptProcess


def external_process(job_folder: Path) -> bool:
    """Whether the job unpacked in ``job_folder`` asks for its script in a process of its own."""
    toml = job_folder / JOB_TOML
    try:
        spec = parse_job_toml(toml.read_text(encoding="utf-8"), str(toml), check_strategy=False)
    except (OSError, UnicodeDecodeError):
        return False
    return bool(spec.client.get("external_process", False))


class SimLauncher:
    """The ``fedbus.site.child.Launcher`` SimEnv gives its sites: threads, or processes where a job asks."""

    def __init__(self, threads: ThreadLauncher, omp_threads: int) -> None:
        self.threads = threads
        self.omp_threads = omp_threads
        self.processes: list[ScriptProcess] = []

    async def start(
        self, python: str, script: Path, args: Sequence[str], *, cwd: Path, env: Mapping[str, str], log_path: Path
    ) -> ScriptThread | ScriptProcess:
        if not external_process(cwd):
            return await self.threads.start(python, script, args, cwd=cwd, env=env, log_path=log_path)
        child_env = dict(env)
        child_env.setdefault("OMP_NUM_THREADS", str(self.omp_threads))
        src = str(Path(__file__).resolve().parents[2])  # the folder holding fedbus/: a source tree works too
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (src, child_env.get("PYTHONPATH")) if p)
        proc = await ScriptProcess.start(python, script, args, cwd=cwd, env=child_env, log_path=log_path)
        self.processes = [p for p in self.processes if p.returncode is None] + [proc]
        return proc

    def kill(self) -> None:
        """Last resort: SIGKILL every child script still running (their sites normally stop them)."""
        for p in self.processes:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
