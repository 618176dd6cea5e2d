"""The controller's strategy lane: a large update is decided on the job's strategy thread while the event
loop keeps running, and every strategy call still happens one at a time, in the order its event came."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from fedbus.broker.controller import JobController
from fedbus.broker.store import JobStore
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.messages import Message, Result, Task
from fedbus.strategy import Action, FedAvg, Strategy, Update

pytestmark = pytest.mark.timeout(30)


class RecordingBus:
    """A bus whose sites are all connected; what the controller sends is recorded, nothing is streamed."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []

    def peer_of(self, site: str) -> bytes | None:
        return site.encode()

    async def send(self, peer: bytes, msg: Message, payload: Any = ()) -> None:
        if isinstance(msg, Task):
            self.tasks.append(msg)

    async def stream(self, peer: bytes, source: ModelSource, route: dict, sid: int) -> None:
        return None


class HeldFedAvg(FedAvg):
    """FedAvg that records every call (with the thread it ran on) and can hold an update until released."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[str, str]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.deciding = threading.Event()

    def on_update(self, update: Update, now: float) -> list[Action]:
        self.calls.append(("on_update:" + update.site, threading.current_thread().name))
        self.deciding.set()
        assert self.hold.wait(10)
        return super().on_update(update, now)

    def site_left(self, site: str, now: float) -> list[Action]:
        self.calls.append(("site_left:" + site, threading.current_thread().name))
        return super().site_left(site, now)


def _controller(tmp_path: Path, strategy: Strategy) -> tuple[JobController, RecordingBus, JobStore]:
    store = JobStore(tmp_path)
    store.create_job("j", "j", {}, state="running")
    bus = RecordingBus()
    ctl = JobController("j", {}, strategy, store, bus, max_model_bytes=1 << 30, upload_slots=asyncio.Semaphore(2))
    return ctl, bus, store


def _result(task: Task, value: float) -> tuple[Result, dict[str, torch.Tensor]]:
    result = Result(job_id="j", task_id=task.task_id, version=task.version, params_type="FULL", weight=1.0)
    return result, {"w": torch.full((1000,), value)}


async def test_a_large_update_is_decided_off_the_loop_and_later_events_wait_for_it(tmp_path: Path) -> None:
    strategy = HeldFedAvg(min_clients=2, num_rounds=2)
    ctl, bus, store = _controller(tmp_path, strategy)
    ctl.start({"w": torch.zeros(1000)}, ["a", "b", "c"])
    await asyncio.sleep(0)  # the dispatches' send tasks run
    tasks = {t.task_id.split("-")[1]: t for t in bus.tasks}
    assert sorted(tasks) == ["a", "b", "c"]

    strategy.hold.clear()
    decided = ctl._update("a", *_result(tasks["a"], 1.0), heavy=True)
    assert decided is not None
    assert await asyncio.to_thread(strategy.deciding.wait, 5)
    # The loop runs on while the strategy thread decides; status shows the state from before the update.
    await asyncio.sleep(0.05)
    assert ctl.status()["strategy"]["round_accepted"] == 0
    ctl.site_left("c", "gone")  # waits its turn: the strategy hears of it after the update
    light = ctl._update("b", *_result(tasks["b"], 3.0))  # a small update behind it waits too
    assert light is not None
    assert [c for c, _ in strategy.calls] == ["on_update:a"]

    strategy.hold.set()
    await asyncio.wait_for(asyncio.gather(decided, light), 10)
    assert [c for c, _ in strategy.calls] == ["on_update:a", "site_left:c", "on_update:b"]
    threads = dict(strategy.calls)
    assert threads["on_update:a"].startswith("fedbus-strategy")
    assert threads["site_left:c"] == threads["on_update:b"] == threading.current_thread().name
    accepted = [u["task_id"] for u in store.updates("j") if u["accepted"]]
    assert sorted(accepted) == sorted([tasks["a"].task_id, tasks["b"].task_id])
    # With c gone, a and b close the round: the mean of 1 and 3.
    assert strategy.version == 1
    assert torch.equal(strategy.model["w"], torch.full((1000,), 2.0))

    # With nothing in flight (the second round is running) a light call is made at once, on the loop.
    assert ctl._lane is None and ctl.state == "running"
    ctl.site_left("b", "gone")
    assert strategy.calls[-1] == ("site_left:b", threading.current_thread().name)
    await ctl.close()
    store.close()


async def test_a_failing_strategy_call_fails_its_own_future_and_not_the_ones_behind_it(tmp_path: Path) -> None:
    strategy = HeldFedAvg(min_clients=2, num_rounds=1)
    ctl, bus, store = _controller(tmp_path, strategy)
    ctl.start({"w": torch.zeros(1000)}, ["a", "b"])
    await asyncio.sleep(0)
    tasks = {t.task_id.split("-")[1]: t for t in bus.tasks}

    def broken(update: Update, now: float) -> list[Action]:
        raise RuntimeError("strategy bug")

    strategy.on_update = broken  # type: ignore[method-assign]
    failing = ctl._update("a", *_result(tasks["a"], 1.0), heavy=True)
    assert failing is not None
    ctl.site_left("b", "gone")
    with pytest.raises(RuntimeError, match="strategy bug"):
        await asyncio.wait_for(failing, 10)
    await asyncio.sleep(0.05)
    assert [c for c, _ in strategy.calls] == ["site_left:b"]
    assert ctl._lane is None
    await ctl.close()
    store.close()
