"""The aggregator extension point on real daemons: a strategy whose sites send something other than the global
model's tensors (a gradient) declares it with ``input_spec()``; the broker checks every offer against that
declaration before taking its payload, the strategy's ``validate_input()`` judges the values, and the job's
``[client]`` table with the strategy's ``client_options()`` reaches the script as ``Task.options``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import torch

from fedbus.modelio import serde
from fedbus.strategy import STRATEGIES, Accepted, Action, Finished, Publish, Rejected, Strategy, Update
from fedbus.strategy._tasks import TaskBook
from fedbus.strategy.base import Params, copy_model
from tests.broker.harness import federation, wait_job

pytestmark = pytest.mark.timeout(90)

# site-1 and site-2 send a gradient of ones; site-3 sends the global model's tensor (what plain FedAvg would take);
# site-4 a gradient with a NaN. Every site checks the options its task carried and says what it saw.
SCRIPT = """
import sys
import torch
import fedbus.client as flare
from fedbus.client import api

flare.init()
site = flare.get_site_name()
while flare.is_running():
    model = flare.receive()
    options = api._get()._current.options
    if options != {"lr_hint": 0.5, "memory_gc_rounds": 2, "exchange": "pytorch"}:
        sys.exit(f"unexpected task options {options!r}")
    grad = torch.ones(2, 1)
    if site == "site-3":
        params = {"w": model.params["w"] + 1}
    else:
        if site == "site-4":
            grad[0, 0] = float("nan")
        params = {"gradient": grad}
    flare.send(flare.FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""


class GradientStep(Strategy):
    """One gradient step per round from the mean of the sites' gradients: w -= lr * mean(gradient)."""

    def __init__(self, min_clients: int, num_rounds: int, lr: float = 0.5) -> None:
        self.min_clients, self.num_rounds, self.lr = min_clients, num_rounds, lr
        self._book = TaskBook()
        self._global: dict[str, torch.Tensor] = {}
        self._version = 0
        self._grads: list[torch.Tensor] = []
        self._done = False

    def client_options(self) -> dict[str, Any]:
        return {"lr_hint": self.lr, "memory_gc_rounds": 99}  # the job's [client] table wins on memory_gc_rounds

    def input_spec(self) -> Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None:
        return {"gradient": (torch.float32, tuple(self._global["w"].shape))}

    def _reference(self) -> Params:
        return {n: torch.empty(shape, dtype=dt, device="meta") for n, (dt, shape) in self.input_spec().items()}  # type: ignore[union-attr]

    @property
    def version(self) -> int:
        return self._version

    @property
    def model(self) -> Params:
        return MappingProxyType(self._global)

    @property
    def done(self) -> bool:
        return self._done

    @property
    def next_deadline(self) -> float | None:
        return None

    def state(self) -> dict[str, object]:
        return {"strategy": "gradient_step", "version": self._version}

    def start(self, model: Params, sites: Sequence[str], now: float, *, version: int = 0) -> list[Action]:
        self._global, self._version = copy_model(model), version
        return [self._book.issue(s, self._version) for s in sorted(sites)]

    def site_joined(self, site: str, now: float) -> list[Action]:
        return []

    def site_left(self, site: str, now: float) -> list[Action]:
        self._book.close_site(site, "left")
        return self._maybe_close()

    def task_failed(self, site: str, task_id: str, reason: str, now: float, *, blame: bool = True) -> list[Action]:
        self._book.close(task_id, reason)
        return self._maybe_close()

    def tick(self, now: float) -> list[Action]:
        return []

    def on_update(self, update: Update, now: float) -> list[Action]:
        task = self._book.claim(update)
        if isinstance(task, str):
            return [Rejected(update.task_id, update.site, task)]
        reason = "no params" if update.params is None else self.validate_input(self._reference(), update.params)
        if reason is not None:
            return [Rejected(update.task_id, update.site, reason), *self._maybe_close()]
        assert update.params is not None
        self._grads.append(update.params["gradient"].clone())
        return [Accepted(task.task_id, task.site, task.version, 0, 1.0), *self._maybe_close()]

    def _maybe_close(self) -> list[Action]:
        if len(self._book) or self._done:
            return []
        if len(self._grads) < self.min_clients:
            self._done = True
            return [Finished(f"only {len(self._grads)} gradients")]
        step = torch.stack(self._grads).mean(0)
        self._global = {"w": self._global["w"] - self.lr * step}
        self._version += 1
        self._grads = []
        self._done = True
        return [Publish(self._version, self._global, {}), Finished("one step taken")]


async def test_a_declared_input_is_taken_and_anything_else_refused_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(STRATEGIES, "gradient_step", GradientStep)
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "client.py").write_text(SCRIPT)
    serde.write_file(folder / "model.safetensors", serde.layout({"w": torch.zeros(2, 1)}))
    (folder / "job.toml").write_text(
        'name = "grad"\nmodel = "model.safetensors"\n\n[strategy]\nname = "gradient_step"\nmin_clients = 2\n'
        'num_rounds = 1\n\n[script]\npath = "client.py"\n\n[sites]\nmin = 4\nmax = 4\n\n'
        '[client]\nmemory_gc_rounds = 2\nexchange = "pytorch"\nlog_streaming = false\n'
    )
    async with federation(tmp_path, sites=4) as (broker, _sites, admin):
        job_id = await admin.submit(folder)
        job = await wait_job(admin, job_id)
        assert job["state"] == "finished", job["reason"]
        assert job["reason"] == "one step taken"
        assert not broker.store.events(job_id, "crashed")  # every script saw the options it expected
        updates = {u["site"]: u for u in broker.store.updates(job_id)}
        assert updates["site-1"]["accepted"] and updates["site-2"]["accepted"]
        # The global model's own tensor is refused at the offer, before any payload byte, naming the mismatch.
        assert not updates["site-3"]["accepted"]
        assert "upload failed" in updates["site-3"]["reason"]
        assert "missing 'gradient'" in updates["site-3"]["reason"] and "unexpected 'w'" in updates["site-3"]["reason"]
        # A gradient of the declared shape with a NaN passes the offer; validate_input refuses it.
        assert not updates["site-4"]["accepted"] and "non-finite" in updates["site-4"]["reason"]
        final = serde.read_file(broker.store.checkpoint_path(job_id, 1))
        assert torch.equal(final["w"], torch.full((2, 1), -0.5))
