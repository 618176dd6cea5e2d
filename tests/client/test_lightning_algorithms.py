"""``flare.patch(trainer)`` applies FedProx and SCAFFOLD when the task says so, with the script unchanged.

A tiny LightningModule trains on one fixed batch against a fake site (real zmq link); the weights and controls it
sends are checked against the same SGD steps computed by hand, so the gradients changed exactly as the math says.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq.asyncio

pytest.importorskip("lightning")

import fedbus.client.lightning as flare
from fedbus.client import ClientSession
from fedbus.client.api import bind_thread
from fedbus.modelio import serde
from fedbus.protocol.messages import EndJob, Reply, Result
from tests.client.helpers import JOB, FakeSite
from tests.client.test_api import connected

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings(
        "ignore::DeprecationWarning",
        "ignore::FutureWarning",
        "ignore:.*does not have many workers:UserWarning",
        "ignore:.*no `val_dataloader`:UserWarning",
    ),
]

LR = 0.1
STEPS = 3  # one batch per epoch, three epochs per round
X = torch.tensor([[1.0, 2.0], [0.5, -1.0], [-1.5, 0.25], [2.0, 1.0]])
Y = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def task_loss(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(X @ weight.T + bias, Y)


def make_module(package: str) -> Any:
    pl = importlib.import_module(package)

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)
            self.__fl_meta__ = {"CUSTOM_VAR": "value"}  # FLARE's way to add to the sent model's meta

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return task_loss(self.lin.weight, self.lin.bias)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", task_loss(self.lin.weight, self.lin.bias))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LR)

    return pl, Tiny()


def run_script(session: ClientSession, package: str) -> None:
    """A FLARE Lightning script, unchanged: patch, then validate and fit while the job runs."""
    bind_thread(session)
    try:
        pl, module = make_module(package)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=4)
        trainer = pl.Trainer(
            max_epochs=STEPS,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        flare.patch(trainer)
        while flare.is_running():
            flare.receive()
            trainer.validate(module, loader, verbose=False)
            trainer.fit(module, loader)
    finally:
        bind_thread(None)


def by_hand(
    weight: torch.Tensor, bias: torch.Tensor, *, mu: float = 0.0, correction: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``STEPS`` SGD steps from the global model: grad of the task loss + mu (w - w_global) [+ c - c_i]."""
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    for _ in range(STEPS):
        gw, gb = torch.autograd.grad(task_loss(w, b), [w, b])
        gw, gb = gw + mu * (w.detach() - weight), gb + mu * (b.detach() - bias)
        if correction is not None:
            gw, gb = gw + correction[0], gb + correction[1]
        with torch.no_grad():
            w -= LR * gw
            b -= LR * gb
    return w.detach(), b.detach()


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[FakeSite]:
    ctx = zmq.asyncio.Context()
    fake = FakeSite(ctx, tmp_path)
    try:
        yield fake
    finally:
        fake.close()
        ctx.destroy(linger=0)


async def serve_rounds(site: FakeSite, tasks: list[tuple[dict[str, torch.Tensor], dict, str]]) -> list[Result]:
    """Push each task, answer its result, then end the job; returns the results."""
    results = []
    for i, (params, options, params_type) in enumerate(tasks):
        await site.push_task(f"t{i}", params, options=options, params_type=params_type)
        inc = await site.recv(timeout=30)
        assert isinstance(inc.msg, Result), inc.msg
        await site.send(Reply(rid=0, ok=True))
        results.append(inc.msg)
    await site.send(EndJob(JOB, "finished"))
    return results


async def run_job(
    site: FakeSite, session: ClientSession, package: str, tasks: list[tuple[dict[str, torch.Tensor], dict, str]]
) -> list[Result]:
    """The script in a thread, the fake site serving ``tasks``; a script that fails fails the test at once."""
    script = asyncio.create_task(asyncio.to_thread(run_script, session, package))
    serve = asyncio.create_task(serve_rounds(site, tasks))
    done, _ = await asyncio.wait({script, serve}, timeout=45, return_when=asyncio.FIRST_EXCEPTION)
    if script in done and script.exception() is not None:
        serve.cancel()
        raise script.exception()  # type: ignore[misc]
    results = await asyncio.wait_for(serve, 5)
    await asyncio.wait_for(script, 30)
    return results


GLOBAL = {"lin.weight": torch.tensor([[0.5, -0.5]]), "lin.bias": torch.tensor([0.25])}


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
async def test_fedprox_pulls_every_step_towards_the_global_model(site: FakeSite, package: str) -> None:
    if package == "pytorch_lightning":
        pytest.importorskip("pytorch_lightning")  # FLARE's examples import the standalone package
    session = await connected(site)
    try:
        [result] = await run_job(site, session, package, [(GLOBAL, {"fedprox_mu": 0.5}, "FULL")])
        sent = serde.read_file(result.path)
        w, b = by_hand(GLOBAL["lin.weight"], GLOBAL["lin.bias"], mu=0.5, correction=None)
        torch.testing.assert_close(sent["lin.weight"], w)
        torch.testing.assert_close(sent["lin.bias"], b)
        plain_w, _ = by_hand(GLOBAL["lin.weight"], GLOBAL["lin.bias"], correction=None)
        assert not torch.allclose(plain_w, w, atol=1e-4)  # the proximal pull changed the steps
        assert result.weight == STEPS and "val_loss" in result.metrics
    finally:
        session.close()


async def test_without_options_the_patch_trains_plain_sgd(site: FakeSite) -> None:
    session = await connected(site)
    try:
        [result] = await run_job(site, session, "lightning.pytorch", [(GLOBAL, {}, "FULL")])
        assert result.meta["CUSTOM_VAR"] == "value" and result.weight == STEPS
        sent = serde.read_file(result.path)
        w, b = by_hand(GLOBAL["lin.weight"], GLOBAL["lin.bias"], correction=None)
        torch.testing.assert_close(sent["lin.weight"], w)
        torch.testing.assert_close(sent["lin.bias"], b)
    finally:
        session.close()


async def test_scaffold_corrects_gradients_and_sends_option_ii_controls_over_two_rounds(site: FakeSite) -> None:
    c1 = (torch.tensor([[0.2, -0.1]]), torch.tensor([0.3]))
    x2 = {"lin.weight": torch.tensor([[0.1, 0.2]]), "lin.bias": torch.tensor([-0.5])}
    c2 = (torch.tensor([[-0.4, 0.05]]), torch.tensor([0.0]))

    def with_controls(x: dict[str, torch.Tensor], c: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**x, "scaffold.c.lin.weight": c[0], "scaffold.c.lin.bias": c[1]}

    session = await connected(site)
    try:
        results = await run_job(
            site,
            session,
            "lightning.pytorch",
            [
                (with_controls(GLOBAL, c1), {"scaffold": True}, "DIFF"),
                (with_controls(x2, c2), {"scaffold": True}, "DIFF"),
            ],
        )

        # round 1: c_i = 0, so every step's gradient gains c
        sent = serde.read_file(results[0].path)
        w, b = by_hand(GLOBAL["lin.weight"], GLOBAL["lin.bias"], correction=c1)
        dw, db = w - GLOBAL["lin.weight"], b - GLOBAL["lin.bias"]
        torch.testing.assert_close(sent["lin.weight"], dw)
        torch.testing.assert_close(sent["lin.bias"], db)
        ci_w, ci_b = -c1[0] - dw / (STEPS * LR), -c1[1] - db / (STEPS * LR)  # c_i+ = 0 - c + (x - y)/(K lr)
        torch.testing.assert_close(sent["scaffold.c.lin.weight"], ci_w)
        torch.testing.assert_close(sent["scaffold.c.lin.bias"], ci_b)

        # round 2: the correction is c - c_i with the c_i kept from round 1
        sent = serde.read_file(results[1].path)
        w, b = by_hand(x2["lin.weight"], x2["lin.bias"], correction=(c2[0] - ci_w, c2[1] - ci_b))
        dw, db = w - x2["lin.weight"], b - x2["lin.bias"]
        torch.testing.assert_close(sent["lin.weight"], dw)
        torch.testing.assert_close(sent["lin.bias"], db)
        new_w = ci_w - c2[0] - dw / (STEPS * LR)
        torch.testing.assert_close(sent["scaffold.c.lin.weight"], new_w - ci_w)
        torch.testing.assert_close(session.scaffold.c_local["lin.weight"], new_w)
    finally:
        session.close()
