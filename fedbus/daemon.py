"""What the broker and site daemons share: their life cycle, their receive loop, their zmq context, their tasks.

Life cycle (uvicorn's shape). ``Lifecycle.run()`` (the CLI: blocks until a signal) → ``serve()`` →
``startup()`` / ``main_loop()`` / ``shutdown(deadline)``, the three phases being the daemon's own
(``Service``). A signal handler only sets ``should_exit``, which ``main_loop`` watches; a second signal
forces the exit (``force_exit`` is set and the daemon's ``on_force_exit`` runs). ``async with lifecycle``
serves in the background of the caller's loop (tests, SimEnv) and shuts down on leaving.

Receive loop. ``answer_messages`` is the one reader of an endpoint: every message goes to the handler; an
undecodable one (``BadMessage``), or one whose handling raised an error the daemon answers, goes to its
``refuse`` callback, and the loop goes on: nothing a peer sends ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn, Protocol

from fedbus._memory import tune_malloc
from fedbus.errors import FedbusError
from fedbus.transport.context import Context
from fedbus.transport.endpoint import BadMessage, Endpoint, Incoming, daemon_context

SIGNALS = (signal.SIGINT, signal.SIGTERM)


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

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM. The process is the daemon's own, so its allocator is tuned for it (not when
        a daemon runs inside someone else's process: SimEnv, tests)."""
        tune_malloc()
        asyncio.run(self.serve(install_signals=True))

    async def serve(self, *, install_signals: bool = False) -> None:
        await self.service.startup()
        self.started.set()
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in SIGNALS:
                loop.add_signal_handler(sig, self.handle_exit)
        try:
            await self.service.main_loop()
        finally:
            try:
                await self.service.shutdown(self.shutdown_deadline)
            finally:
                if install_signals:
                    for sig in SIGNALS:
                        loop.remove_signal_handler(sig)

    def handle_exit(self) -> None:
        """A signal: the first asks for a graceful shutdown, a second forces it."""
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
