"""The training script as a child process: started in its own session, logged to a file, stopped for sure.

Why a process group: a training script starts DataLoader workers, compilers and sometimes a shell; a
stop that signals only the script's own PID leaves them holding the GPU. ``start_new_session=True``
makes the script the leader of a new process group (its PID is the group id), so a stop signals the
whole group, and a final SIGKILL to the group sweeps up whatever outlived the leader. The new session
also keeps a Ctrl-C at the site's terminal from reaching the script: the site decides when it stops.

stdout and stderr go to one log file (appended, so a redeployed job keeps its history); the last lines
of that file are what the broker sees when the script crashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from fedbus.errors import JobError

TAIL_BYTES = 4096
TAIL_LINES = 30


class Script(Protocol):
    """A running training script as the runner sees it: a child process here, a thread in the simulator."""

    @property
    def pid(self) -> int: ...

    async def wait(self) -> int: ...

    async def stop(self, term_after: float, kill_after: float = 5.0) -> int: ...

    def kill(self) -> None: ...

    def signal_group(self, sig: int) -> None: ...

    def tail(self) -> str: ...


class Launcher(Protocol):
    """Starts a job's script. The default is :class:`ScriptProcess` (a child process in its own session);
    ``fedbus.recipes.SimEnv`` passes one that runs the script in a thread of the site's own process."""

    async def start(
        self, python: str, script: Path, args: Sequence[str], *, cwd: Path, env: Mapping[str, str], log_path: Path
    ) -> Script: ...


class ScriptProcess:
    """One running training script; ``wait`` returns its exit code, ``stop`` ends it within bounds."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @classmethod
    async def start(
        cls,
        python: str,
        script: Path,
        args: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        log_path: Path,
    ) -> ScriptProcess:
        """Start ``python script *args``; raises JobError if it cannot be started at all."""
        with open(log_path, "ab") as out:  # the child keeps its own descriptor; ours closes now
            try:
                proc = await asyncio.create_subprocess_exec(
                    python,
                    str(script),
                    *args,
                    cwd=str(cwd),
                    env=dict(env),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise JobError(f"cannot start {python} {script}: {exc}") from exc
        return cls(proc, log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def wait(self) -> int:
        return await self.proc.wait()

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the script's whole process group (quietly, if it is already gone)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def stop(self, term_after: float, kill_after: float = 5.0) -> int:
        """Let the script exit by itself for ``term_after`` s, then SIGTERM, then SIGKILL; returns the code.

        The group gets a final SIGKILL even after a clean exit, for children the script left behind.
        """
        if not await self._exits_within(term_after):
            self.signal_group(signal.SIGTERM)
            if not await self._exits_within(kill_after):
                self.signal_group(signal.SIGKILL)
        code = await self.proc.wait()
        self.signal_group(signal.SIGKILL)
        return code

    async def _exits_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), seconds)
        except TimeoutError:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the whole group now (a forced shutdown, a task over its time limit)."""
        self.signal_group(signal.SIGKILL)

    def tail(self) -> str:
        """The last lines the script wrote (what a crash report shows)."""
        return read_tail(self.log_path)


def read_tail(path: Path, max_bytes: int = TAIL_BYTES, max_lines: int = TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first line is probably cut
    return "\n".join(lines[-max_lines:])
