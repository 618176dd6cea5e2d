"""Slow-loris uploads over a real broker and real sockets: sites of a job that offer their result, take the credit
and send no chunk hold the only upload slot until a good site's big upload waits for it; then each loses the slot
(its stream aborted with the reason, its task failed and audited), the good site's uploads go through and the job
finishes, long before the streams' stall timeout."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import pytest
import torch

from fedbus.audit import read_audit
from fedbus.bench.scale import SimSite
from fedbus.errors import FedbusError
from fedbus.modelio import serde
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.messages import Chunk, Result, Task
from fedbus.transport.context import Context
from tests.broker.harness import federation, wait_job, write_job

CHUNK = 16 * 1024
ELEMENTS = 16 * 1024  # a 64 KiB float32 model: four chunks, above the small-upload size, so it needs a slot
VERSIONS = 3
FEDBUFF = f'name = "fedbuff"\nconcurrency = 3\nbuffer_size = 1\nnum_versions = {VERSIONS}\n'


class Loris(SimSite):
    """A site of the job whose uploads are offered and credited, and never get a chunk; it notes why they end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures: list[str] = []

    async def send(self, peer: bytes, msg: Any, payload: Any = ()) -> None:
        if isinstance(msg, Chunk):
            return  # credit taken, nothing sent
        await super().send(peer, msg, payload)

    async def _answer(self, task: Task) -> None:
        sid = secrets.randbits(62)
        try:
            await self.send(b"", Result(task.job_id, task.task_id, task.version, "DIFF", 1.0, {}, {}, sid))
            await self.hub.send(b"", self.delta, {"job_id": task.job_id, "task_id": task.task_id}, sid)
        except FedbusError as exc:
            self.failures.append(str(exc))


async def _until(pred: Any, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def _scenario(tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # one slot, a short bound: the stall timeout (60 s) would outlast the test many times over
    async with federation(tmp, sites=0, upload_slots=1, upload_stall_s=0.5, stall_timeout_s=60.0) as (broker, _, admin):
        ctx = Context()
        delta = ModelSource.from_state_dict({"w": torch.full((ELEMENTS,), 1e-3)})
        good = SimSite("site-1", broker.address, ctx, delta, chunk=CHUNK)
        lorises = [Loris(f"site-{i}", broker.address, ctx, delta, chunk=CHUNK) for i in (2, 3)]
        runs = [asyncio.ensure_future(s.run()) for s in (good, *lorises)]
        try:
            job = write_job(tmp / "job", strategy=FEDBUFF)
            serde.write_file(job / "model.safetensors", serde.layout({"w": torch.zeros(ELEMENTS)}))
            job_id = await admin.submit(job)
            out["job"] = await wait_job(admin, job_id, timeout=40)
            out["accepted"] = [u["site"] for u in broker.store.updates(job_id) if u["accepted"]]
            out["heard"] = [f for s in lorises for f in s.failures]
            out["taken"] = broker.uploads.slots.taken_total
        finally:
            for s in (good, *lorises):
                s.ended.set()
            for r in runs:
                r.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
            for s in (good, *lorises):
                s.ep.close()
            ctx.term()
        ws = Path(broker.config.workspace)
        out["audit"] = [r for r in read_audit(ws / "audit.jsonl") if r.get("kind") == "update_failed"]
    return out


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return asyncio.run(_scenario(tmp_path_factory.mktemp("slowloris")))


def test_the_good_sites_big_uploads_go_through_and_the_job_finishes(attacked: dict[str, Any]) -> None:
    assert attacked["job"]["state"] == "finished", attacked["job"]
    assert attacked["accepted"].count("site-1") >= VERSIONS
    assert not {"site-2", "site-3"} & set(attacked["accepted"])


def test_a_stalled_upload_loses_its_slot_with_the_reason(attacked: dict[str, Any]) -> None:
    assert attacked["taken"] >= 1
    assert any("upload stalled" in f for f in attacked["heard"]), attacked["heard"]  # the site heard why
    failed = [r for r in attacked["audit"] if "upload stalled" in r.get("reason", "")]
    assert failed and {r["site"] for r in failed} <= {"site-2", "site-3"}, attacked["audit"]
