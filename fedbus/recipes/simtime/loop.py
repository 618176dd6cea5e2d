"""A simulated clock as an asyncio event loop: time jumps to the next event, nothing ever sleeps.

Theory of operation. ``SimLoop`` is the standard selector event loop with two changes. ``time()`` reads a
``SimClock`` instead of ``time.monotonic()``, so every ``asyncio.sleep``, ``call_later``, ``wait_for``
timeout and every ``now`` the broker reads from its loop (deadlines, liveness, a strategy's ``now``) is
simulated time. And the selector, asked to wait, first polls the real file descriptors without waiting; only
when the loop is *idle* does the clock move, straight to the next event:

* the loop is busy while anything runs in an executor (``run_in_executor``, hence ``asyncio.to_thread``:
  checkpoints, spooling, the strategy thread) or while someone ``hold``s the clock (a worker computing a
  task whose result time is not known yet). Then the selector waits for real, for the thread to call back;
* otherwise the next event is the earlier of the loop's first timer and the first event of the clock's
  *sources* (``EventSource``: the simulated sites' results, availability changes). A source's event runs
  alone, one per idle loop, so everything it causes (an upload, the strategy's decision, the next dispatch)
  has happened before the next event is looked at: events at one instant are taken in the order the
  sources give them, and a loop timer at the same instant goes first. Nothing depends on thread timing,
  which is what makes a simulation reproducible.

This is the conservative rule of discrete-event simulation: time advances to an event only once nothing that
could produce an earlier one is still working. Outside callers (the recipe's thread, through
``run_coroutine_threadsafe``) wake the loop through its self-pipe as usual; with nothing scheduled at all
the loop waits for them in real time, in short slices.
"""

from __future__ import annotations

import asyncio
import heapq
import selectors
import time
from collections.abc import Callable
from typing import Any, Protocol

IDLE_POLL_S = 0.05
"""Real seconds the selector waits at most when the loop is busy or has nothing scheduled."""


class EventSource(Protocol):
    """Something with events at simulated times of its own (the site host)."""

    def next_event(self) -> float | None:
        """The simulated time of the next event, or None."""

    def fire(self) -> None:
        """Run the next event (the clock is at its time)."""


class SimClock:
    """Simulated seconds; ``hold`` keeps the clock where it is until every hold is released."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)
        self.holds = 0
        self.sources: list[EventSource] = []

    def hold(self) -> None:
        self.holds += 1

    def release(self) -> None:
        if self.holds <= 0:
            raise RuntimeError("SimClock.release() without a hold")
        self.holds -= 1

    def next_source(self) -> tuple[float, EventSource] | None:
        """The earliest source event, ties to the source registered first."""
        best: tuple[float, EventSource] | None = None
        for source in self.sources:
            t = source.next_event()
            if t is not None and (best is None or t < best[0]):
                best = (t, source)
        return best


class _SimSelector(selectors.BaseSelector):
    """The real selector, asked without waiting; when the loop is idle, the clock jumps instead of a wait."""

    def __init__(self, real: selectors.BaseSelector) -> None:
        self.real = real
        self.loop: SimLoop | None = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self.real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.real.modify(fileobj, events, data)

    def get_map(self) -> Any:
        return self.real.get_map()

    def close(self) -> None:
        self.real.close()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = self.real.select(0)
        if events or timeout == 0 or self.loop is None:
            return events
        return self.loop._idle(self.real)


class SimLoop(asyncio.SelectorEventLoop):
    """An event loop on a :class:`SimClock` (see the module docstring). ``simulated`` tells daemons so."""

    simulated = True

    def __init__(self, clock: SimClock | None = None) -> None:
        selector = _SimSelector(selectors.DefaultSelector())
        super().__init__(selector)
        selector.loop = self
        self.clock = clock or SimClock()
        self.executor_jobs = 0
        self.idle_jumps = 0
        self.waits = {"busy": 0, "nothing": 0}
        self.waited_s = {"busy": 0.0, "nothing": 0.0}

    def time(self) -> float:
        return self.clock.now

    def run_in_executor(self, executor: Any, func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:  # type: ignore[override]
        future = super().run_in_executor(executor, func, *args)
        self.executor_jobs += 1
        future.add_done_callback(self._executor_done)
        return future

    def _executor_done(self, _: asyncio.Future[Any]) -> None:
        self.executor_jobs -= 1

    def _next_timer(self) -> float | None:
        scheduled: list[asyncio.TimerHandle] = self._scheduled  # type: ignore[attr-defined]
        while scheduled and scheduled[0].cancelled():
            heapq.heappop(scheduled)
            self._timer_cancelled_count -= 1  # type: ignore[attr-defined]
        return scheduled[0].when() if scheduled else None

    def _idle(self, real: selectors.BaseSelector) -> list[tuple[selectors.SelectorKey, int]]:
        """Nothing is ready: wait for a thread if one works, else move the clock to the next event."""
        if self.executor_jobs or self.clock.holds:
            return self._wait(real, "busy")
        timer = self._next_timer()
        source = self.clock.next_source()
        if source is not None and (timer is None or source[0] < timer):
            self.clock.now = max(self.clock.now, source[0])
            self.idle_jumps += 1
            self.call_soon(source[1].fire)
            return []
        if timer is not None:
            self.clock.now = max(self.clock.now, timer)
            self.idle_jumps += 1
            return []
        return self._wait(real, "nothing")

    def _wait(self, real: selectors.BaseSelector, why: str) -> list[tuple[selectors.SelectorKey, int]]:
        """Wait in real time (a thread works, or nothing is scheduled); counted for the benchmark."""
        started = time.perf_counter()
        events = real.select(IDLE_POLL_S)
        self.waits[why] += 1
        self.waited_s[why] += time.perf_counter() - started
        return events


def simulated(loop: asyncio.AbstractEventLoop | None = None) -> bool:
    """Whether ``loop`` (default: the running one) runs on simulated time."""
    loop = loop or asyncio.get_running_loop()
    return bool(getattr(loop, "simulated", False))
