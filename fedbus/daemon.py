"""What the broker and site daemons share: their life cycle, their receive loop, their zmq context, their tasks.

Life cycle (uvicorn's shape). ``Lifecycle.run()`` (the CLI: blocks until a signal) → ``serve()`` →
``startup()`` / ``main_loop()`` / ``shutdown(deadline)``, the three phases being the daemon's own
(``Service``). A signal handler only sets ``should_exit``, which ``main_loop`` watches; a second signal
forces the exit (``force_exit`` is set and the daemon's ``on_force_exit`` runs). ``async with lifecycle``
serves in the background of the caller's loop (tests, SimEnv) and shuts down on leaving.

A signal ends the process under any load. The handler is a Python signal handler (``signal.signal``), which the
interpreter runs between two bytecodes of the main thread even while the event loop is busy, not a callback
of the loop (``add_signal_handler``), which a loop that never comes back to its selector never runs. It hands
the exit to the loop and starts a watchdog thread: a loop that has not taken the signal up within
``STUCK_S``, or a shutdown that outlasts its deadline by ``STUCK_S``, ends the process (``on_force_exit``,
then ``os._exit``). The loop is not expected to be stuck (no send waits on a peer: ``fedbus.transport``); the
watchdog is the bound if it ever is.

Receive loop. ``answer_messages`` is the one reader of an endpoint: every message goes to the handler; an
undecodable one (``BadMessage``), or one whose handling raised an error the daemon answers, goes to its
``refuse`` callback, and the loop goes on: nothing a peer sends ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn, Protocol

from fedbus._memory import tune_malloc
from fedbus.errors import FedbusError
from fedbus.log import get_logger
from fedbus.transport.context import Context
from fedbus.transport.endpoint import BadMessage, Endpoint, Incoming, daemon_context

log = get_logger("daemon")
SIGNALS = (signal.SIGINT, signal.SIGTERM)
STUCK_S = 1.0
"""Seconds a daemon's loop has to take a signal up (and, after its shutdown deadline, to finish) before the
watchdog ends the process."""


class Service(Protocol):
    """A daemon's three phases, driven by its ``Lifecycle``."""

    async def startup(self) -> None: ...

    async def main_loop(self) -> None: ...

    async def shutdown(self, deadline: float) -> None: ...


class Lifecycle:
    """Runs a ``Service``: ``run()`` blocks (the CLI); ``async with`` serves in the background.

    ``shutdown_deadline`` bounds the graceful part of the service's shutdown; ``on_force_exit`` is what a
    second signal does (the broker exits at once, a site kills its scripts first)."""

    def __init__(
        self, service: Service, *, shutdown_deadline: float, on_force_exit: Callable[[], None] | None = None
    ) -> None:
        self.service = service
        self.shutdown_deadline = shutdown_deadline
        self.on_force_exit = on_force_exit
        self.should_exit = asyncio.Event()
        self.force_exit = False
        self.started = asyncio.Event()
        self._serving: asyncio.Task[None] | None = None
        self._acked = threading.Event()  # the loop took a signal up
        self._stopped = threading.Event()  # shutdown is over
        self._watchdog: threading.Thread | None = None

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM. The process is the daemon's own, so its allocator is tuned for it (not when
        a daemon runs inside someone else's process: SimEnv, tests)."""
        tune_malloc()
        asyncio.run(self.serve(install_signals=True))

    async def serve(self, *, install_signals: bool = False) -> None:
        await self.service.startup()
        self.started.set()
        loop = asyncio.get_running_loop()
        previous: dict[int, Any] = {}
        if install_signals:
            for sig in SIGNALS:
                previous[sig] = signal.signal(sig, lambda _sig, _frame: self._signalled(loop))
        try:
            await self.service.main_loop()
        finally:
            try:
                await self.service.shutdown(self.shutdown_deadline)
            finally:
                self._stopped.set()
                for signum, handler in previous.items():
                    signal.signal(signum, handler)

    def _signalled(self, loop: asyncio.AbstractEventLoop) -> None:
        """A signal, in the main thread between two bytecodes: the loop is asked to exit, and watched."""
        with contextlib.suppress(RuntimeError):  # a closed loop: the process is ending anyway
            loop.call_soon_threadsafe(self.handle_exit)
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="fedbus-exit-watchdog", daemon=True)
            self._watchdog.start()

    def _watch(self) -> None:
        """End the process if the loop does not take the signal up, or its shutdown outlasts the deadline."""
        if self._acked.wait(STUCK_S) and self._stopped.wait(self.shutdown_deadline + STUCK_S):
            return
        log.error("the daemon did not stop in time: exiting now", stuck_s=STUCK_S)
        try:
            if self.on_force_exit is not None:
                self.on_force_exit()
        finally:
            os._exit(1)

    def handle_exit(self) -> None:
        """A signal: the first asks for a graceful shutdown, a second forces it."""
        self._acked.set()
        if self.should_exit.is_set():
            self.force_exit = True
            if self.on_force_exit is not None:
                self.on_force_exit()
        self.should_exit.set()

    async def __aenter__(self) -> Lifecycle:
        self._serving = asyncio.ensure_future(self.serve())
        started = asyncio.ensure_future(self.started.wait())
        await asyncio.wait({self._serving, started}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if self._serving.done():
            self._serving.result()  # startup failed: raise its error here
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.should_exit.set()
        if self._serving is not None:
            await self._serving


Refuse = Callable[[bytes, Incoming | None, Exception], Awaitable[None]]
"""``refuse(peer, message or None when it could not be decoded, the error)``: log it and answer the peer."""


async def answer_messages(
    endpoint: Endpoint,
    handle: Callable[[Incoming], Awaitable[None]],
    refuse: Refuse,
    *,
    answered: tuple[type[Exception], ...] = (FedbusError,),
) -> NoReturn:
    """Read ``endpoint`` forever: each message goes to ``handle``; a ``BadMessage``, or an error of the
    ``answered`` types raised by ``handle``, goes to ``refuse`` and the loop reads on. Any other exception
    ends the loop (a handler's way to say the connection is over).

    No timeout around the receive: ``wait_for`` can swallow a cancellation that races a message, and a
    cancelled zmq receive loses nothing."""
    while True:
        try:
            inc = await endpoint.recv()
        except BadMessage as exc:
            await refuse(exc.peer, None, exc)
            continue
        try:
            await handle(inc)
        except answered as exc:
            await refuse(inc.peer, inc, exc)


def owned_context(ctx: Context | None, *, server: bool, shared: bool = False) -> tuple[Context, Callable[[], None]]:
    """A daemon's zmq context and how to let it go: the one it was given (not its to close), the process's
    shared one (``shared``: never closed), or a context of its own, destroyed on release."""
    if ctx is not None:
        return ctx, lambda: None
    if shared:
        return daemon_context(shared=True, server=server), lambda: None
    own = daemon_context(server=server)
    return own, lambda: own.destroy(linger=0)


class Background:
    """A daemon's background tasks: kept referenced while they run, cancelled together at shutdown."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def cancel(self, deadline: float | None = None) -> None:
        """Cancel every task and wait for them to end, at most ``deadline`` seconds (None: as long as it takes)."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), deadline)


SIM_TIME_KEY = "sim/time_s"
"""The metric a global version carries, on a simulated clock, with the simulated time it was published at."""


def loop_now() -> float:
    """The daemons' clock: the running loop's time. On the standard loop that is ``time.monotonic()``; on a
    simulated loop (``fedbus.recipes.simtime``) it is simulated seconds, so deadlines, liveness and the ``now``
    a strategy gets all follow the simulated clock without a second implementation."""
    return asyncio.get_running_loop().time()


def loop_is_simulated() -> bool:
    """Whether the running loop's time is simulated (the loop says so with a ``simulated`` attribute)."""
    return bool(getattr(asyncio.get_running_loop(), "simulated", False))
