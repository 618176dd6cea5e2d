"""The simulated clock's event loop: time jumps to the next event, but never while work that could cause an
earlier one is still running."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from fedbus.recipes.simtime.loop import SimClock, SimLoop, simulated


def run(coro_fn, clock: SimClock | None = None):  # type: ignore[no-untyped-def]
    loop = SimLoop(clock)
    try:
        return loop.run_until_complete(coro_fn())
    finally:
        loop.close()


def test_an_hour_of_sleep_takes_no_time_and_timers_fire_in_order() -> None:
    async def main() -> tuple[float, list[str], bool]:
        fired: list[str] = []
        loop = asyncio.get_running_loop()
        loop.call_later(30.0, fired.append, "b")
        loop.call_later(10.0, fired.append, "a")
        started = time.monotonic()
        await asyncio.sleep(3600)
        assert time.monotonic() - started < 5.0
        return loop.time(), fired, simulated()

    now, fired, sim = run(main)
    assert now == 3600.0 and fired == ["a", "b"] and sim


def test_the_clock_waits_for_executor_work_and_holds() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        seen: list[tuple[str, float]] = []
        clock = loop.clock  # type: ignore[attr-defined]

        def work() -> None:
            time.sleep(0.1)  # real time: the simulated clock must not move meanwhile

        timer = asyncio.ensure_future(asyncio.sleep(5.0))
        await loop.run_in_executor(None, work)
        seen.append(("executor done", loop.time()))
        clock.hold()
        threading.Timer(0.1, lambda: loop.call_soon_threadsafe(clock.release)).start()
        await asyncio.sleep(0)
        seen.append(("held", loop.time()))
        await timer
        seen.append(("timer", loop.time()))
        return seen

    assert run(main) == [("executor done", 0.0), ("held", 0.0), ("timer", 5.0)]


class Source:
    """Events at given times; each fire records (name, time)."""

    def __init__(self, clock: SimClock, times: list[float], log: list[tuple[str, float]]) -> None:
        self.clock, self.times, self.log = clock, sorted(times), log

    def next_event(self) -> float | None:
        return self.times[0] if self.times else None

    def fire(self) -> None:
        self.log.append(("source", self.times.pop(0)))
        assert self.clock.now == self.log[-1][1]


def test_source_events_run_one_at_a_time_and_a_timer_at_the_same_instant_goes_first() -> None:
    clock = SimClock()
    log: list[tuple[str, float]] = []
    clock.sources.append(Source(clock, [2.0, 1.0, 2.0], log))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(2.0, lambda: log.append(("timer", loop.time())))
        await asyncio.sleep(3.0)

    run(main, clock)
    assert log == [("source", 1.0), ("timer", 2.0), ("source", 2.0), ("source", 2.0)]


def test_release_without_hold_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        SimClock().release()
