"""What the controller sends for each kind of Dispatch (no sockets: a bus that records): the global version, a
model of the dispatch's own (one stream source per model name, shared by the sites), or nothing for
``submit_model``; every task with the job's options; cross-site cells recorded under the model's name."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedbus.broker.controller import JobController, input_reference, task_options
from fedbus.broker.store import JobStore
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.messages import Message, Result, Task
from fedbus.strategy import FedAvg
from fedbus.strategy.cross_site import CrossSiteEval

pytestmark = pytest.mark.timeout(30)


class RecordingBus:
    """Every site connected; tasks and the sources streamed for them are recorded."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []
        self.streams: dict[str, ModelSource] = {}  # task id -> what was streamed for it

    def peer_of(self, site: str) -> bytes | None:
        return site.encode()

    async def send(self, peer: bytes, msg: Message, payload: Any = ()) -> None:
        if isinstance(msg, Task):
            self.tasks.append(msg)

    async def stream(self, peer: bytes, source: ModelSource, route: dict, sid: int) -> None:
        self.streams[route["task_id"]] = source


def _site(task: Task) -> str:
    """The site of a cross-site task: its id is ``xsite-N-SITE`` plus the controller's epoch."""
    return task.task_id.split("-", 2)[2].rsplit(".", 1)[0]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_task_options_merge_the_client_table_over_the_strategy_and_keep_only_client_keys() -> None:
    class Mu(FedAvg):
        def client_options(self) -> dict[str, Any]:
            return {"fedprox_mu": 0.1, "transfer_type": "FULL"}

    client = {"transfer_type": "DIFF", "exchange": "numpy", "external_process": True, "log_streaming": True}
    options = task_options(Mu(min_clients=1, num_rounds=1), client)
    assert options == {"fedprox_mu": 0.1, "transfer_type": "DIFF", "exchange": "numpy"}


def test_the_input_reference_is_the_declared_tensors_as_meta_or_the_global_model() -> None:
    class Declares(FedAvg):
        def input_spec(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
            return {"gradient": (torch.float64, (3, 1))}

    s = Declares(min_clients=1, num_rounds=1)
    s.start({"w": torch.zeros(3)}, ["a"], 0.0)
    ref = input_reference(s)
    assert list(ref) == ["gradient"] and ref["gradient"].is_meta
    assert ref["gradient"].dtype == torch.float64 and ref["gradient"].shape == (3, 1)
    assert s.validate_input(ref, {"gradient": torch.ones(3, 1, dtype=torch.float64)}) is None
    assert "shape mismatch" in str(s.validate_input(ref, {"gradient": torch.ones(3, dtype=torch.float64)}))
    assert input_reference(s, "submit_model")["w"] is s.model["w"]


async def test_cross_site_tasks_stream_named_models_once_per_name_and_cells_are_recorded(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    store.create_job("j", "j", {}, state="running")
    bus = RecordingBus()
    pretrained = {"w": torch.full((4,), 3.0)}
    strategy = CrossSiteEval(None, {"pretrained": pretrained})
    spec = {"client": {"memory_gc_rounds": 2, "log_streaming": True}}
    ctl = JobController("j", spec, strategy, store, bus, max_model_bytes=1 << 20, upload_slots=asyncio.Semaphore(1))
    ctl.start({"w": torch.zeros(4)}, ["a", "b"])
    await _settle()
    submits = list(bus.tasks)
    assert [t.kind for t in submits] == ["submit_model", "submit_model"]
    assert all(t.sid is None and t.options == {"memory_gc_rounds": 2, "submit_model": True} for t in submits)
    assert all(t.params_type == "FULL" and not t.meta for t in submits) and not bus.streams

    for t in submits:  # neither site has a local model: both fail, and the evaluation phase begins
        ctl.task_failed(_site(t), t.task_id, "no local model")
    await _settle()
    evals = bus.tasks[2:]
    assert [(t.kind, t.model_name) for t in evals] == [("evaluate", "server"), ("evaluate", "server")]
    assert all(t.options == {"memory_gc_rounds": 2} and t.sid is not None for t in evals)
    assert all(bus.streams[t.task_id] is ctl.streams.source for t in evals)  # the global version, as for any evaluation

    for round_ in range(2):  # each site answers its current task; the next model follows
        current = bus.tasks[2 + 2 * round_ :]
        for t in current:
            result = Result("j", t.task_id, t.version, "FULL", 1.0, {"acc": 0.5 + round_})
            ctl.on_result(_site(t).encode(), _site(t), result)
        await _settle()
    named = bus.tasks[4:]
    assert [t.model_name for t in named] == ["pretrained", "pretrained"]
    first, second = (bus.streams[t.task_id] for t in named)
    assert first is second and first is not ctl.streams.source  # one source for the model name, shared by the sites
    assert ctl.state == "finished"
    assert store.cross_site("j") == {
        "server": {"a": {"acc": 0.5}, "b": {"acc": 0.5}},
        "pretrained": {"a": {"acc": 1.5}, "b": {"acc": 1.5}},
    }
    assert store.events("j", "evaluation") == []
    await _settle()
    written = store.job_dir("j") / "cross_site_val" / "cross_val_results.json"
    for _ in range(100):  # the file is written off the loop as the job ends
        if written.exists():
            break
        await asyncio.sleep(0.02)
    assert json.loads(written.read_text()) == store.cross_site("j")
    await ctl.close()
    store.close()
