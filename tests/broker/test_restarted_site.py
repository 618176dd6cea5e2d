"""A site whose daemon came back as a new process before the broker declared it gone: the controller sends
again the tasks that died with the old process, keeps the ones the site says it holds, and fails those on a
version it no longer streams. The registry tells such a hello from a reconnect. No sockets: a real controller,
strategy and store over a bus that records."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path

import pytest
import torch

from fedbus.broker.registry import Registry
from fedbus.broker.server import check_holds
from fedbus.errors import PeerError
from fedbus.protocol.messages import MAX_HELD, Task
from fedbus.site.uploads import held_tasks
from fedbus.strategy import FedAvg, FedBuff
from tests.broker.test_strategy_lane import RecordingBus, _controller, _result

pytestmark = pytest.mark.timeout(30)


def _of(bus: RecordingBus, site: str) -> list[Task]:
    return [t for t in bus.tasks if t.task_id.split("-")[1] == site]


async def test_a_restarted_site_gets_its_task_again_under_the_same_id(tmp_path: Path) -> None:
    ctl, bus, store = _controller(tmp_path, FedAvg(min_clients=3, num_rounds=1))
    ctl.start({"w": torch.zeros(1000)}, ["a", "b", "c"])
    await asyncio.sleep(0)
    [first] = _of(bus, "b")

    again = ctl.site_restarted("b", frozenset())
    # Between the claim and the send (the broker deploys the job there first) the old download fails: ignored.
    ctl.task_failed("b", first.task_id, "model download failed: the site restarted", first.sid)
    assert first.task_id in ctl.streams.tasks
    ctl.send_again(again)
    await asyncio.sleep(0)
    [_, resent] = _of(bus, "b")
    assert resent.task_id == first.task_id and resent.version == first.version and resent.kind == first.kind
    assert resent.sid != first.sid and ctl.streams.tasks[first.task_id].sid == resent.sid  # a new download
    assert len(_of(bus, "a")) == len(_of(bus, "c")) == 1  # the other sites' tasks are left alone
    for site, value in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        decided = ctl._update(site, *_result(_of(bus, site)[-1], value))
        if decided is not None:
            await decided
    assert ctl.state == "finished"
    accepted = sorted(u["site"] for u in store.updates("j") if u["accepted"])
    assert accepted == ["a", "b", "c"]  # b answered once, under its one task id
    assert torch.equal(ctl.strategy.model["w"], torch.full((1000,), 2.0))
    await ctl.close()
    store.close()


async def test_a_task_the_restarted_site_holds_is_not_sent_again(tmp_path: Path) -> None:
    ctl, bus, store = _controller(tmp_path, FedAvg(min_clients=2, num_rounds=1))
    ctl.start({"w": torch.zeros(1000)}, ["a", "b"])
    await asyncio.sleep(0)
    [held] = _of(bus, "b")
    assert ctl.site_restarted("b", frozenset({held.task_id})) == []  # its upload resumes from the disk
    await asyncio.sleep(0)
    assert _of(bus, "b") == [held] and ctl.streams.tasks[held.task_id].sid == held.sid
    ctl.task_failed("b", held.task_id, "the download failed", held.sid)  # the current sid does fail it
    assert held.task_id not in ctl.streams.tasks
    await ctl.close()
    store.close()


async def test_a_task_on_a_version_no_longer_streamed_fails_and_the_strategy_sends_the_new_one(tmp_path: Path) -> None:
    """The failure is not the site's: with ``max_task_failures=1`` one counted failure would bench it."""
    ctl, bus, store = _controller(tmp_path, FedBuff(concurrency=2, buffer_size=1, num_versions=5, max_task_failures=1))
    ctl.start({"w": torch.zeros(1000)}, ["a", "b"])
    await asyncio.sleep(0)
    [old] = _of(bus, "b")
    result, params = _result(_of(bus, "a")[0], 1.0)
    decided = ctl._update("a", dataclasses.replace(result, params_type="DIFF"), params)  # version 1 is published
    if decided is not None:
        await decided
    await asyncio.sleep(0)
    assert ctl.streams.source_version == 1 and old.version == 0

    assert ctl.site_restarted("b", frozenset()) == []
    await asyncio.sleep(0)
    [_, new] = _of(bus, "b")
    assert new.version == 1 and new.task_id != old.task_id
    [failed] = [u for u in store.updates("j") if u["task_id"] == old.task_id]
    assert not failed["accepted"] and failed["reason"] == "the site restarted and lost the task"
    assert ctl.strategy.state()["failed_tasks"] == 1
    await ctl.close()
    store.close()


class OldSignatureFedAvg(FedAvg):
    """A strategy written before ``task_failed`` took ``blame``."""

    def task_failed(self, site: str, task_id: str, reason: str, now: float) -> list:  # type: ignore[override]
        return super().task_failed(site, task_id, reason, now)


async def test_a_strategy_without_the_blame_keyword_still_hears_of_failures(tmp_path: Path) -> None:
    ctl, bus, store = _controller(tmp_path, OldSignatureFedAvg(min_clients=2, num_rounds=1))
    ctl.start({"w": torch.zeros(1000)}, ["a", "b"])
    await asyncio.sleep(0)
    [task] = _of(bus, "b")
    ctl.task_failed("b", task.task_id, "upload refused")
    await asyncio.sleep(0)
    assert ctl.strategy.state()["failed_tasks"] == 1
    await ctl.close()
    store.close()


async def test_a_download_not_started_yet_when_the_site_restarted_is_not_sent_twice(tmp_path: Path) -> None:
    ctl, bus, store = _controller(tmp_path, FedAvg(min_clients=2, num_rounds=1))
    ctl.start({"w": torch.zeros(1000)}, ["a", "b"])  # the dispatches' sends have not run yet
    ctl.send_again(ctl.site_restarted("b", frozenset()))
    await asyncio.sleep(0)
    [only] = _of(bus, "b")  # the first send saw it was replaced and stood down
    assert ctl.streams.tasks[only.task_id].sid == only.sid
    await ctl.close()
    store.close()


def test_the_registry_tells_a_restarted_process_from_a_reconnect() -> None:
    reg = Registry(heartbeat_s=1.0, liveness=5)
    assert reg.hello(b"p1", "s", "one", {}, 0.0)[1] == "new"
    assert reg.hello(b"p1", "s", "one", {}, 1.0)[1] == "same"  # the same process reconnected
    assert reg.hello(b"p2", "s", "two", {}, 2.0)[1] == "restarted"  # a new process, the old one still online
    assert reg.expire(100.0)[0].name == "s"
    assert reg.hello(b"p2", "s", "two", {}, 101.0)[1] == "back"  # declared gone, then heard again
    reg.expire(200.0)
    assert reg.hello(b"p3", "s", "three", {}, 201.0)[1] == "back"  # its tasks were closed when it left


def test_held_tasks_in_a_hello_are_checked() -> None:
    assert check_holds(["0-a-1.e1", "1-a-2.e1"], "a") == {"0-a-1.e1", "1-a-2.e1"}
    with pytest.raises(PeerError, match="^a: .*not a task id") as refused:
        check_holds(["../../etc/passwd"], "a")
    assert refused.value.peer == "a"  # the site at fault, named
    with pytest.raises(PeerError, match="not a task id"):
        check_holds([7], "a")
    with pytest.raises(PeerError, match="more than"):
        check_holds([f"t{i}" for i in range(MAX_HELD + 1)], "a")


def test_a_site_names_the_uploads_its_jobs_keep_newest_first(tmp_path: Path) -> None:
    for job, task, age in (("j1", "0-s-1.e", 10), ("j2", "3-s-9.e", 1000)):  # j2's: a job that ended long ago
        (tmp_path / job / "uploads").mkdir(parents=True)
        (tmp_path / job / "uploads" / f"{task}.result").write_bytes(b"x")
        (tmp_path / job / "uploads" / f"{task}.safetensors").write_bytes(b"x")
        os.utime(tmp_path / job / "uploads" / f"{task}.result", (time.time() - age,) * 2)
    (tmp_path / "j1" / "uploads" / "half.result.tmp").write_bytes(b"x")  # never finished: not held
    assert held_tasks(tmp_path, 10) == ["0-s-1.e", "3-s-9.e"]
    assert held_tasks(tmp_path, 1) == ["0-s-1.e"]
    assert held_tasks(tmp_path / "none", 10) == []
