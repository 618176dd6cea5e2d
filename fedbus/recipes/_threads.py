"""SimEnv's launcher: each site's training script runs in a thread of the simulator's own process.

Why threads: a child process per site costs a Python start and a torch import (seconds) per site and per
job; a thread costs nothing, and torch releases the GIL inside its kernels, so a few small models train
side by side well enough to simulate a federation on a laptop.

How a script is run: its code is compiled and executed in a fresh module namespace named ``__main__``
(``if __name__ == "__main__": main()`` works), with ``sys.argv = [script, *args]`` set once for the job
(the same for every site, so argparse sees the job's arguments) and the script's folder first on
``sys.path`` (``from net import Net`` finds the job's own file). ``runpy.run_path`` is not used because it
swaps ``sys.modules["__main__"]`` and ``sys.argv[0]`` process-wide for as long as the script runs, which
races when N scripts run at once. Every site unpacks the same job archive, so the first site's folder
serves the imports of all of them; modules of that name imported from elsewhere are dropped from
``sys.modules`` first, and everything is put back when the simulator stops.

What a script prints goes to its site: while the simulator runs, ``sys.stdout`` and ``sys.stderr`` are proxies
(``OutputRouter``) that copy each script thread's writes into its site's ``script.log`` (what a child process's
output goes to) besides the console, so the site's crash tail and log streaming see it as they would a child's.
Threads a script starts itself write to the console only. Rich's process-wide console is made one per thread
likewise (``RichConsoles``), so progress bars of several scripts do not collide.

Each thread gets its own client session (``fedbus.client.api.bind_thread``), built from the variables the
site would have put in a child's environment. ``num_threads`` caps how many scripts *train* at once: a
slot is taken when ``receive()`` hands out a task and given back at ``send()``. A thread that raises is a
crashed script (exit code 1, the traceback as its log tail); one that does not end when its job ends gets
an asynchronous exception, and is abandoned (it is a daemon thread) if even that does not stop it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ctypes
import importlib.util
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from fedbus.client.api import ClientSession, bind_thread
from fedbus.client.model import FLModel
from fedbus.log import get_logger

ABANDON_AFTER_S = 2.0
log = get_logger("recipes.threads")


class ScriptStopped(BaseException):
    """Raised inside a script thread that did not end by itself (its job ended, or its task timed out)."""


class SimSession(ClientSession):
    """A script thread's session: training holds one of the simulator's ``num_threads`` slots."""

    slots: threading.Semaphore | None = None
    _holding = False

    def receive(self, timeout: float | None = None) -> FLModel | None:
        model = super().receive(timeout)
        if model is not None and not self._holding and self.slots is not None:
            self.slots.acquire()
            self._holding = True
            self._task_started = time.monotonic()  # training time starts once a slot is ours
        return model

    def send(self, model: FLModel, clear_cache: bool = True) -> bool:
        self._release()
        return super().send(model, clear_cache)

    def close(self) -> None:
        self._release()
        super().close()

    def _release(self) -> None:
        if self._holding and self.slots is not None:
            self._holding = False
            self.slots.release()


class _RoutedStream:
    """``sys.stdout`` or ``sys.stderr`` while the simulator runs: writes go to the original stream, and a script
    thread's also to its site's log file."""

    def __init__(self, original: TextIO, routes: dict[int, TextIO]) -> None:
        self.original = original
        self.routes = routes

    def write(self, text: str) -> int:
        f = self.routes.get(threading.get_ident())
        if f is not None:
            with contextlib.suppress(OSError, ValueError):  # a full disk must not break the script's print()
                f.write(text)
        return self.original.write(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.original, name)


class OutputRouter:
    """Routes each script thread's stdout/stderr to its site's log file, as a child process's output is."""

    def __init__(self) -> None:
        self.routes: dict[int, TextIO] = {}  # thread ident -> its site's log file
        self._saved: tuple[TextIO, TextIO] | None = None

    def install(self) -> None:
        if self._saved is None:
            self._saved = (sys.stdout, sys.stderr)
            sys.stdout = _RoutedStream(sys.stdout, self.routes)
            sys.stderr = _RoutedStream(sys.stderr, self.routes)

    def restore(self) -> None:
        """Put the original streams back (unless someone replaced the proxies since) and close every route."""
        if self._saved is not None:
            if isinstance(sys.stdout, _RoutedStream) and sys.stdout.routes is self.routes:
                sys.stdout = self._saved[0]
            if isinstance(sys.stderr, _RoutedStream) and sys.stderr.routes is self.routes:
                sys.stderr = self._saved[1]
            self._saved = None
        for ident in list(self.routes):
            self.unbind(ident)

    def bind(self, log_path: Path) -> None:
        """The calling thread's output goes to ``log_path`` too (appended, line-buffered for log streaming)."""
        with contextlib.suppress(OSError):
            self.routes[threading.get_ident()] = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115

    def unbind(self, ident: int | None = None) -> None:
        f = self.routes.pop(threading.get_ident() if ident is None else ident, None)
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


class _ThreadConsoles:
    """Rich's global console (``rich.get_console()``) while the simulator runs: one real console per thread.

    Rich keeps one console per process, with a stack of its live displays; two script threads showing progress
    bars at once (Lightning's ``RichProgressBar``, its default where rich is installed) push and pop on one stack
    and crash each other. A script run by its own site process has a console of its own: this gives each script
    thread the same."""

    _local = threading.local()  # per-thread consoles, shared by every instance (there is one at a time)

    def _console(self) -> Any:
        console = getattr(self._local, "console", None)
        if console is None:
            from rich.console import Console

            console = self._local.console = Console()
        return console

    def __getattr__(self, name: str) -> Any:
        return getattr(self._console(), name)

    def __enter__(self) -> Any:  # dunders bypass __getattr__: Console's own are forwarded by hand
        return self._console().__enter__()

    def __exit__(self, *exc: object) -> None:
        self._console().__exit__(*exc)

    def __setattr__(self, name: str, value: Any) -> None:
        # rich.reconfigure() replaces the global console's __dict__: this thread's console is the one meant.
        setattr(self._console(), name, value)


class RichConsoles:
    """Installs :class:`_ThreadConsoles` as rich's global console, if rich is installed, and puts back what was."""

    def __init__(self) -> None:
        self._saved: tuple[Any, Any] | None = None

    def install(self) -> None:
        if self._saved is not None or importlib.util.find_spec("rich") is None:
            return
        import rich

        self._saved = (rich, rich._console)
        rich._console = _ThreadConsoles()  # type: ignore[assignment]

    def restore(self) -> None:
        if self._saved is not None:
            module, console = self._saved
            if isinstance(module._console, _ThreadConsoles):
                module._console = console
            self._saved = None


class ScriptImports:
    """``sys.argv``, ``sys.path`` and the output streams for the simulator's script threads, restored by
    ``restore``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._argv: list[str] | None = None
        self._folders: dict[str, Path] = {}  # job id -> the folder on sys.path for it
        self.output = OutputRouter()
        self.consoles = RichConsoles()

    def prepare(self, job_id: str, script: Path, args: Sequence[str]) -> None:
        with self._lock:
            if job_id in self._folders:
                return
            if self._argv is None:
                self._argv = sys.argv
                self.output.install()
                self.consoles.install()
            sys.argv = [str(script), *args]
            folder = script.parent
            _forget_shadowed(folder)
            sys.path.insert(0, str(folder))
            self._folders[job_id] = folder

    def restore(self) -> None:
        with self._lock:
            for folder in self._folders.values():
                with contextlib.suppress(ValueError):
                    sys.path.remove(str(folder))
                for name, mod in list(sys.modules.items()):
                    if _inside(getattr(mod, "__file__", None), folder):
                        del sys.modules[name]
            self._folders.clear()
            if self._argv is not None:
                sys.argv, self._argv = self._argv, None
            self.output.restore()
            self.consoles.restore()


def _inside(file: str | None, folder: Path) -> bool:
    """Whether a module's ``__file__`` lies in ``folder`` (a string test: thousands of modules are checked)."""
    return isinstance(file, str) and os.path.abspath(file).startswith(os.path.join(os.path.abspath(folder), ""))


def _forget_shadowed(folder: Path) -> None:
    """Drop modules named like the folder's own .py files and packages that were imported from elsewhere."""
    names = {p.stem for p in folder.glob("*.py")} | {p.parent.name for p in folder.glob("*/__init__.py")}
    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] in names and not _inside(getattr(mod, "__file__", None), folder):
            del sys.modules[name]


class ScriptThread:
    """One script running in a thread, with the interface of a child process (``fedbus.site.child.Script``)."""

    def __init__(self, script: Path, session: SimSession, log_path: Path, output: OutputRouter) -> None:
        self.script = script
        self.session = session
        self.log_path = log_path
        self.output = output
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[int] = self.loop.create_future()
        self._tail = ""
        self.thread = threading.Thread(target=self._main, name=f"fedbus-{session.site_name}", daemon=True)

    def start(self) -> ScriptThread:
        self.thread.start()
        return self

    @property
    def pid(self) -> int:
        return self.thread.native_id or 0

    def _main(self) -> None:
        code = 0
        bind_thread(self.session)
        self.output.bind(self.log_path)
        try:
            source = compile(self.script.read_bytes(), str(self.script), "exec")
            namespace: dict[str, Any] = {
                "__name__": "__main__",
                "__file__": str(self.script),
                "__builtins__": builtins,
                "__package__": None,
                "__spec__": None,
                "__loader__": None,
                "__cached__": None,
                "__doc__": None,
            }
            exec(source, namespace)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            self._tail = "" if code == 0 else f"SystemExit({exc.code!r})"
        except ScriptStopped:
            code = -15
        except BaseException:
            code, self._tail = 1, traceback.format_exc()
            log.warning("script thread raised", site=self.session.site_name, error=self._tail.splitlines()[-1])
        finally:
            with contextlib.suppress(BaseException):
                self.session.close()
            bind_thread(None)
            self.output.unbind()
            if self._tail:
                with contextlib.suppress(OSError), open(self.log_path, "a") as f:
                    f.write(self._tail + "\n")
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                self.loop.call_soon_threadsafe(self._resolve, code)

    def _resolve(self, code: int) -> None:
        if not self.done.done():
            self.done.set_result(code)

    async def wait(self) -> int:
        return await asyncio.shield(self.done)

    async def stop(self, term_after: float, kill_after: float = 5.0) -> int:
        """Let the script end by itself (its job ended), then interrupt it, then abandon it."""
        if not await self._exits_within(term_after):
            self._interrupt()
            if not await self._exits_within(kill_after):
                self._abandon()
        return await self.wait()

    async def _exits_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self.done), seconds)
        except TimeoutError:
            return False
        return True

    def kill(self) -> None:
        self._interrupt()
        self.loop.call_later(ABANDON_AFTER_S, self._abandon)

    def _interrupt(self) -> None:
        ident = self.thread.ident
        if ident is not None and self.thread.is_alive():
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(ScriptStopped))

    def _abandon(self) -> None:
        if not self.done.done():
            log.warning("script thread does not stop: abandoned (daemon thread)", site=self.session.site_name)
            self._tail = self._tail or "the script thread did not stop"
            self.done.set_result(-9)

    def signal_group(self, sig: int) -> None:
        """A thread has no process group: nothing to signal."""

    def tail(self) -> str:
        return self._tail


class ThreadLauncher:
    """The ``fedbus.site.child.Launcher`` that SimEnv gives its sites."""

    def __init__(self, slots: threading.Semaphore, imports: ScriptImports) -> None:
        self.slots = slots
        self.imports = imports
        self.threads: list[ScriptThread] = []

    async def start(
        self, python: str, script: Path, args: Sequence[str], *, cwd: Path, env: Mapping[str, str], log_path: Path
    ) -> ScriptThread:
        session = SimSession.from_env(env, watch_parent=False)  # the site is this very process
        assert isinstance(session, SimSession)
        session.slots = self.slots
        self.imports.prepare(session.job_id, script, args)
        thread = ScriptThread(script, session, log_path, self.imports.output).start()
        self.threads.append(thread)
        self.threads = [t for t in self.threads if t.thread.is_alive() or t is thread]
        return thread

    def join(self, timeout: float) -> None:
        """Wait (bounded) for every script thread this launcher started."""
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.thread.join(max(0.0, deadline - time.monotonic()))
