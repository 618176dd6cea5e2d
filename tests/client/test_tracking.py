"""The tracking writers' records, as the site receives them over a real link (the contract's record format)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zmq.asyncio

from fedbus.client import ClientSession
from fedbus.client.api import bind_thread
from fedbus.client.tracking import MLflowWriter, SummaryWriter, WandBWriter
from fedbus.errors import ConfigError
from fedbus.protocol.messages import JobEvent
from tests.client.helpers import JOB, FakeSite
from tests.client.test_api import connected

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[FakeSite]:
    ctx = zmq.asyncio.Context()
    fake = FakeSite(ctx, tmp_path)
    try:
        yield fake
    finally:
        fake.close()
        ctx.destroy(linger=0)


async def records(site: FakeSite, session: ClientSession, calls: Callable[[], None], n: int) -> list[dict[str, Any]]:
    """Run ``calls`` as the script's thread (its session bound, as SimEnv does) and read ``n`` records."""

    def script() -> None:
        bind_thread(session)
        try:
            calls()
        finally:
            bind_thread(None)

    await asyncio.to_thread(script)
    out = []
    for _ in range(n):
        inc = await site.recv()
        assert isinstance(inc.msg, JobEvent) and inc.msg.event == "log" and inc.msg.job_id == JOB, inc.msg
        out.append(inc.msg.data)
    return out


async def test_summary_writer_records(site: FakeSite) -> None:
    session = await connected(site)
    try:

        def calls() -> None:
            writer = SummaryWriter()  # built before or after init: the session is found at each call
            writer.add_scalar(tag="loss", scalar=np.float32(0.5), global_step=3)
            writer.add_scalar("acc", torch.tensor(0.75), np.int64(4))
            writer.add_scalars("lr", {"a": 0.1, "b": 1}, global_step=None)
            writer.flush()

        got = await records(site, session, calls, 3)
        assert got == [
            {"key": "loss", "value": 0.5, "step": 3, "kind": "scalar", "writer": "tensorboard"},
            {"key": "acc", "value": 0.75, "step": 4, "kind": "scalar", "writer": "tensorboard"},
            {"key": "lr", "value": {"a": 0.1, "b": 1}, "step": None, "kind": "scalars", "writer": "tensorboard"},
        ]
    finally:
        session.close()


async def test_mlflow_writer_records(site: FakeSite) -> None:
    session = await connected(site)
    try:

        def calls() -> None:
            writer = MLflowWriter()
            writer.log_metric("loss", 0.25, step=1)
            writer.log_metrics({"acc": 0.5, "f1": np.float64(0.125)}, step=2)
            writer.log_param("lr", 0.01)
            writer.log_params({"optimizer": "SGD", "layers": [3, 4]})
            writer.set_tag("team", "blue")
            writer.set_tags({"phase": 2})
            writer.log_text("hello", "notes/readme.txt")

        got = await records(site, session, calls, 7)
        rows = [(r["key"], r["value"], r["step"], r["kind"]) for r in got]
        assert rows == [
            ("loss", 0.25, 1, "metric"),
            ("metrics", {"acc": 0.5, "f1": 0.125}, 2, "metrics"),
            ("lr", 0.01, None, "param"),
            ("params", {"optimizer": "SGD", "layers": "[3, 4]"}, None, "params"),  # MLflow params are strings
            ("team", "blue", None, "tag"),
            ("tags", {"phase": 2}, None, "tags"),
            ("notes/readme.txt", "hello", None, "text"),
        ]
        assert {r["writer"] for r in got} == {"mlflow"}
    finally:
        session.close()


async def test_wandb_writer_records(site: FakeSite) -> None:
    session = await connected(site)
    try:
        writer = WandBWriter(session)  # or bound to a session explicitly
        await asyncio.to_thread(writer.log, {"loss": 1.0, "acc": 0.0}, 7)
        inc = await site.recv()
        assert inc.msg.data == {
            "key": "metrics",
            "value": {"loss": 1.0, "acc": 0.0},
            "step": 7,
            "kind": "metrics",
            "writer": "wandb",
        }
    finally:
        session.close()


async def test_bad_values_are_refused_naming_the_key(site: FakeSite) -> None:
    session = await connected(site)
    try:
        tb, ml, wb = SummaryWriter(session), MLflowWriter(session), WandBWriter(session)
        with pytest.raises(ConfigError, match=r"scalar 'loss' is nan \(not finite\)"):
            tb.add_scalar("loss", float("nan"), 1)
        with pytest.raises(ConfigError, match=r"scalars of 'lr'\['b'\] is inf"):
            tb.add_scalars("lr", {"a": 1.0, "b": float("inf")})
        with pytest.raises(ConfigError, match="scalar 'acc' must be a number"):
            tb.add_scalar("acc", "high")
        with pytest.raises(ConfigError, match="scalar 'acc' must be a number"):
            tb.add_scalar("acc", torch.ones(2))
        with pytest.raises(ConfigError, match="global_step of 'acc' must be an integer >= 0"):
            tb.add_scalar("acc", 1.0, global_step=-1)
        with pytest.raises(ConfigError, match=r"metrics\['f1'\] is nan"):
            ml.log_metrics({"f1": np.float32("nan")})
        with pytest.raises(ConfigError, match=r"metrics\['ok'\] must be a number"):
            wb.log({"ok": True})
        with pytest.raises(ConfigError, match="non-empty dict"):
            wb.log({})
        with pytest.raises(ConfigError, match="relative path"):
            ml.log_text("x", "../escape.txt")
        with pytest.raises(ConfigError, match="tag must be a non-empty str"):
            tb.add_scalar("", 1.0)
        with pytest.raises(TimeoutError):  # nothing was sent for any of them
            await site.recv(timeout=0.3)
    finally:
        session.close()


def test_tracking_needs_neither_mlflow_nor_wandb_nor_tensorboard(tmp_path: Path) -> None:
    """The writers only send records: importing them loads no tracking library."""
    import subprocess

    code = (
        "import sys, fedbus.client.tracking\n"
        "bad = [m for m in ('mlflow', 'wandb', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=tmp_path)
