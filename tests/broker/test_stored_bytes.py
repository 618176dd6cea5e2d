"""What peers can make the broker store, over a real broker and real sites: a site of a job that floods it with
the largest job events and output it may send is refused past its byte budgets and the store stops growing
while the good sites' job completes; a refused submission leaves no folder or row; a stranger's model offer
does not cancel the submitter's pending upload."""

from __future__ import annotations

import asyncio
import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from fedbus.admin import Admin
from fedbus.audit import read_audit
from fedbus.bench.scale import SimSite
from fedbus.broker.budgets import EVENTS, LOGS
from fedbus.errors import FedbusError, JobError
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.messages import Error, Heartbeat, JobEvent
from fedbus.transport.context import Context
from tests.broker.harness import federation, wait_job, write_job

KiB, MiB = 1 << 10, 1 << 20
BUDGETS = {
    "event_record_kb": 64,
    "events_mb_per_site": 0.25,
    "events_mb_per_job": 1,
    "logs_mb_per_site": 0.25,
    "logs_mb_per_job": 1,
    "max_requests_per_s": 5000.0,  # the byte budgets are what stops this flood, not the message rate
    "request_burst": 5000,
}
BIG = 60 * KiB  # under the record cap: only the budgets refuse these
FLOOD = 30  # records of each kind per flood: about 5 MiB each flood, against budgets of 0.25 MiB per site


class Flooder(SimSite):
    """A site of the job that answers its tasks (so the job can finish) and floods the broker with job events."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.errors: list[Error] = []
        self.pong = asyncio.Event()

    async def _on(self, msg: Any, payload: list[memoryview]) -> None:
        if isinstance(msg, Error):
            self.errors.append(msg)
        elif isinstance(msg, Heartbeat):
            self.pong.set()
        await super()._on(msg, payload)

    async def flood(self, job_id: str) -> None:
        text = "x" * BIG
        for i in range(FLOOD):
            await self.send(b"", JobEvent(job_id, "log", data={"key": "blob", "value": text, "step": i}))
            await self.send(b"", JobEvent(job_id, "log_text", data={"lines": [text[:8000]] * 7, "dropped": 0}))
            await self.send(b"", JobEvent(job_id, "custom", data={"blob": text}))
        await self.sync()

    async def sync(self) -> None:
        """Until the broker has handled everything sent so far (it answers a heartbeat in order)."""
        self.pong.clear()
        await self.send(b"", Heartbeat())
        await asyncio.wait_for(self.pong.wait(), 30)


def _store_bytes(workspace: Path, job_id: str) -> int:
    """The SQLite files and the job's logs folder."""
    files = [*workspace.glob("fedbus.db*"), *(workspace / "jobs" / job_id / "logs").glob("*")]
    return sum(p.stat().st_size for p in files if p.is_file())


async def _until(pred: Any, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def _archive(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(folder.iterdir()):
            if p.name != "model.safetensors":
                zf.write(p, p.name)
    return buf.getvalue()


async def _scenario(tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with federation(tmp, sites=2, **BUDGETS) as (broker, _, admin):
        ws = Path(broker.config.workspace)
        ctx = Context()
        delta = ModelSource.from_state_dict({"w": torch.full((10,), 1e-3)})
        flooder = Flooder("site-3", broker.address, ctx, delta)
        runner = asyncio.ensure_future(flooder.run())
        try:
            job_id = await admin.submit(write_job(tmp / "job", min_clients=3, rounds=3))
            await _until(lambda: "site-3" in (broker.store.job(job_id) or {}).get("sites", []))
            await flooder.flood(job_id)
            await _until(lambda: (ws / "jobs" / job_id / "logs" / "site-3.log").is_file())
            log_file = ws / "jobs" / job_id / "logs" / "site-3.log"
            budgets = broker.store_gate.budgets
            await _until(lambda: log_file.stat().st_size == budgets.used(job_id, LOGS, "site-3"))
            out["after_first"] = _store_bytes(ws, job_id)
            out["events_first"] = broker.store.event_bytes(job_id).get("site-3", 0)
            out["log_first"] = log_file.stat().st_size
            await flooder.flood(job_id)
            await flooder.flood(job_id)
            await _until(lambda: log_file.stat().st_size == budgets.used(job_id, LOGS, "site-3"))
            out["after_more"] = _store_bytes(ws, job_id)
            out["events_more"] = broker.store.event_bytes(job_id).get("site-3", 0)
            out["log_more"] = log_file.stat().st_size
            out["charged"] = {k: budgets.used(job_id, k, "site-3") for k in (EVENTS, LOGS)}
            out["told"] = [e.reason for e in flooder.errors if e.code == "over_budget"]
            out["job"] = await wait_job(admin, job_id)
            out["accepted"] = {u["site"] for u in broker.store.updates(job_id) if u["accepted"]}
            out["good_events"] = broker.store.event_bytes(job_id)
            out["jobs_before"] = {j["id"] for j in broker.store.jobs()}
            out["folders_before"] = {p.name for p in (ws / "jobs").iterdir()}
            await _refused_submission(tmp, admin, out)
            out["jobs_after"] = {j["id"] for j in broker.store.jobs()}
            out["folders_after"] = {p.name for p in (ws / "jobs").iterdir()}
            await _stranger_offer(tmp, broker.address, admin, out)
        finally:
            flooder.ended.set()
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            flooder.ep.close()
            ctx.term()
        out["audit"] = [r for r in read_audit(ws / "audit.jsonl") if r.get("by") == "site-3"]
    return out


async def _refused_submission(tmp: Path, admin: Admin, out: dict[str, Any]) -> None:
    bad = write_job(tmp / "bad-job")
    (bad / "job.toml").write_text('name = "bad"\nmodel = "model.safetensors"\n\n[strategy]\nname = "no-such"\n')
    with pytest.raises(JobError) as refused:
        await admin.request("submit", {"model_bytes": 1000}, payload=[_archive(bad)])
    out["refused_reason"] = str(refused.value)


async def _stranger_offer(tmp: Path, address: str, admin: Admin, out: dict[str, Any]) -> None:
    folder = write_job(tmp / "upload-job")
    source = ModelSource.from_file(folder / "model.safetensors")
    data = await admin.request("submit", {"model_bytes": source.total}, payload=[_archive(folder)])
    job_id = data["job_id"]
    async with Admin(address, name="stranger") as stranger:
        try:
            await asyncio.wait_for(
                stranger._streams().send(b"", source, {"job_id": job_id, "kind": "model"}), timeout=10
            )
            out["stranger_offer"] = "accepted"
        except (FedbusError, TimeoutError) as exc:
            out["stranger_offer"] = f"refused: {exc}"
    try:
        await admin._streams().send(b"", source, {"job_id": job_id, "kind": "model"})  # the submitter's own
    except FedbusError as exc:
        out["upload_state"] = f"the submitter's upload was refused: {exc}"
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while (state := (await admin.status(job_id))["jobs"][0]["state"]) == "uploading" and loop.time() < deadline:
        await asyncio.sleep(0.05)
    out["upload_state"] = state
    await admin.abort(job_id)


@pytest.fixture(scope="module")
def flooded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return asyncio.run(_scenario(tmp_path_factory.mktemp("flooded")))


def test_a_byte_flooder_is_refused_past_its_budget_and_told_once(flooded: dict[str, Any]) -> None:
    per_site = int(BUDGETS["events_mb_per_site"] * MiB)
    assert 0 < flooded["charged"][EVENTS] <= per_site
    assert 0 < flooded["charged"][LOGS] <= per_site
    assert flooded["events_first"] == flooded["events_more"] <= per_site  # nothing more was stored
    assert flooded["log_first"] == flooded["log_more"] <= per_site
    assert len(flooded["told"]) == 2, flooded["told"]  # once for its events, once for its output
    assert any("events budget" in r for r in flooded["told"]) and any("logs budget" in r for r in flooded["told"])


def test_the_store_stops_growing_while_the_good_sites_job_completes(flooded: dict[str, Any]) -> None:
    attempted = 2 * FLOOD * 3 * BIG  # the two later floods: about 10 MiB
    assert flooded["after_more"] - flooded["after_first"] < attempted / 20
    assert flooded["job"]["state"] == "finished", flooded["job"]
    assert {"site-1", "site-2"} <= flooded["accepted"]


def test_refusals_are_audited_once_per_burst_not_once_per_message(flooded: dict[str, Any]) -> None:
    refusals = [r for r in flooded["audit"] if r["kind"] == "refused"]
    assert 2 <= len(refusals) < 10  # about 270 events refused
    assert all("budget" in r["reason"] for r in refusals)


def test_a_refused_submission_leaves_no_folder_or_row(flooded: dict[str, Any]) -> None:
    assert "missing [script]" in flooded["refused_reason"]
    assert flooded["jobs_after"] == flooded["jobs_before"]
    assert flooded["folders_after"] == flooded["folders_before"]


def test_a_strangers_offer_does_not_cancel_the_submitters_upload(flooded: dict[str, Any]) -> None:
    assert flooded["stranger_offer"].startswith("refused"), flooded["stranger_offer"]
    assert flooded["upload_state"] in ("waiting", "running")
