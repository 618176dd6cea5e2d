"""Checkpoints are written in publication order, one at a time, and a disk that falls behind holds new tasks
back instead of letting unwritten models pile up in the broker's memory."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from fedbus.broker.job_streams import CHECKPOINTS_BEHIND
from fedbus.strategy import FedAvg
from tests.broker.test_strategy_lane import _controller, _result

pytestmark = pytest.mark.timeout(30)


class GatedDisk:
    """Wraps ``JobStore.write_checkpoint``: each write waits until the test lets one through (a slow disk)."""

    def __init__(self, write: Any) -> None:
        self.write = write
        self.gate = threading.Semaphore(0)
        self.written: list[int] = []
        self.writing = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self, job_id: str, version: int, model: Any) -> Any:
        with self._lock:
            self.writing += 1
            self.most_at_once = max(self.most_at_once, self.writing)
        try:
            assert self.gate.acquire(timeout=20), "the test never let this write through"
            return self.write(job_id, version, model)
        finally:
            with self._lock:
                self.writing -= 1
                self.written.append(version)


async def _answer(ctl: Any, task: Any, value: float) -> None:
    decided = ctl._update("a", *_result(task, value))
    if decided is not None:  # None: decided on the loop at once
        await decided


async def _until(check: Any, seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while not check():
            await asyncio.sleep(0.01)


async def test_a_disk_that_falls_behind_holds_tasks_back_and_writes_every_version_in_order(tmp_path: Path) -> None:
    rounds = 6
    strategy = FedAvg(min_clients=1, num_rounds=rounds)
    ctl, bus, store = _controller(tmp_path, strategy)
    disk = GatedDisk(store.write_checkpoint)
    store.write_checkpoint = disk  # type: ignore[method-assign]
    ctl.start({"w": torch.zeros(1000)}, ["a"])
    await _until(lambda: len(bus.tasks) == 1)

    # The site answers every task at once; nothing is written yet. Versions go out until CHECKPOINTS_BEHIND
    # are unwritten, then the next task waits for the disk.
    answered = 0
    while answered < len(bus.tasks) and strategy.version < rounds:
        await _answer(ctl, bus.tasks[answered], float(answered + 1))
        answered += 1
        await asyncio.sleep(0.05)  # a held task would have gone out by now
    assert strategy.version == CHECKPOINTS_BEHIND + 1  # published; the task of the next round is held
    assert len(bus.tasks) == CHECKPOINTS_BEHIND + 1
    assert ctl.streams.unsaved == CHECKPOINTS_BEHIND + 1 and disk.written == []

    disk.gate.release()  # one write lands: the held task goes out
    await _until(lambda: len(bus.tasks) == CHECKPOINTS_BEHIND + 2)
    assert disk.written == [1]
    for _ in range(rounds):
        disk.gate.release()
    while strategy.version < rounds:  # the disk keeps up now
        await _until(lambda n=answered: len(bus.tasks) > n)
        await _answer(ctl, bus.tasks[answered], float(answered + 1))
        answered += 1
    await _until(lambda: len(disk.written) == rounds)
    assert disk.written == list(range(1, rounds + 1))  # in publication order
    assert disk.most_at_once == 1  # one write at a time
    assert [h["version"] for h in store.history("j")] == list(range(1, rounds + 1))
    await ctl.close()
    store.close()
