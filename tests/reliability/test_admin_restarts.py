"""Admin requests ride over a broker restart: status and download sent while the broker is down are answered by the
broker that comes back, within the request's own timeout; a submit sent again (same ``submit_key``) is the same job,
its model taken again when the first upload was cut off by the restart. Real brokers on one workspace (started one
after the other in this process), a real admin, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
import torch

from fedbus import jobs
from fedbus.admin import Admin
from fedbus.broker import Broker
from fedbus.config import BrokerConfig
from fedbus.modelio import serde
from fedbus.modelio.sources import ModelSource
from tests.broker.harness import write_job

pytestmark = pytest.mark.timeout(60)
KEY = "0123abcd"


async def _restarted(cfg: BrokerConfig, stack: contextlib.AsyncExitStack, down_s: float = 0.3) -> Broker:
    """Stop the broker of ``stack`` and, ``down_s`` later, start another on the same workspace and address."""
    await stack.aclose()
    await asyncio.sleep(down_s)
    return await stack.enter_async_context(Broker(cfg))


async def test_status_download_and_a_repeated_submit_ride_over_broker_restarts(tmp_path: Path) -> None:
    cfg = BrokerConfig(bind=f"ipc://{tmp_path}/broker.sock", workspace=str(tmp_path / "broker"), heartbeat_s=0.5)
    folder = write_job(tmp_path / "job")
    archive = jobs.pack_job(folder, include_model=False)
    source = ModelSource.from_file(folder / "model.safetensors")
    submit = {"model_bytes": source.total, "submit_key": KEY}
    stack = contextlib.AsyncExitStack()
    broker = await stack.enter_async_context(Broker(cfg))
    try:
        async with Admin(broker.address, timeout=20) as admin:
            job_id = (await admin.request("submit", submit, payload=[archive]))["job_id"]
            assert job_id == f"tiny-{KEY}"
            # The broker restarts before the model came: the job failed with the upload. The same submit again (it is
            # first refused by the new broker, which never heard our hello: the admin says hello and sends it again)
            # takes the same job back, and its model now.
            broker = await _restarted(cfg, stack)
            assert broker.store.job(job_id)["state"] == "failed"  # type: ignore[index]
            again = await admin.request("submit", submit, payload=[archive])
            assert again == {"job_id": job_id}
            await admin._streams().send(b"", source, {"job_id": job_id, "kind": "model"})
            async with asyncio.timeout(10):
                while broker.store.job(job_id)["state"] != "waiting":  # type: ignore[index]
                    await asyncio.sleep(0.02)
            # Once the model is in, a repeated submit is told so, and no second job is made.
            assert await admin.request("submit", submit, payload=[archive]) == {"job_id": job_id, "model": "received"}
            other = jobs.pack_job(write_job(tmp_path / "other", rounds=3), include_model=False)
            with pytest.raises(Exception, match="another job folder"):
                await admin.request("submit", submit, payload=[other])
            assert [j["id"] for j in (await admin.status())["jobs"]] == [job_id]

            # A version to download (no sites here: written as the launcher would).
            model = {"w": torch.arange(10, dtype=torch.float32)}
            broker.store.add_version(job_id, 0, broker.store.write_checkpoint(job_id, 0, model), {})
            # status and download asked while the broker is down: answered by the next one.
            await stack.aclose()
            status = asyncio.ensure_future(admin.status(job_id))
            download = asyncio.ensure_future(admin.download(job_id, tmp_path / "out"))
            await asyncio.sleep(0.5)
            assert not status.done() and not download.done()
            broker = await stack.enter_async_context(Broker(cfg))
            assert (await status)["jobs"][0]["id"] == job_id
            data = await download
            assert data["version"] == 0
            assert torch.equal(serde.read_file(data["model_path"])["w"], model["w"])
    finally:
        await stack.aclose()


async def test_a_request_to_a_broker_that_stays_away_fails_within_its_timeout(tmp_path: Path) -> None:
    cfg = BrokerConfig(bind=f"ipc://{tmp_path}/broker.sock", workspace=str(tmp_path / "broker"), heartbeat_s=0.5)
    async with Broker(cfg) as broker:
        admin = Admin(broker.address, timeout=1.5)
        await admin.__aenter__()
    try:
        with pytest.raises(Exception, match="no reply to 'status' within 2 s"):
            await admin.status()
    finally:
        await admin.__aexit__()


async def test_a_submit_whose_model_upload_a_restart_cut_off_is_one_job(tmp_path: Path) -> None:
    """The broker goes away while the submitted job's model is on its way (here: it refuses the stream, then stops);
    the admin finds a new broker, sends the same submit again and the model with it: one job, its model in."""
    cfg = BrokerConfig(bind=f"ipc://{tmp_path}/broker.sock", workspace=str(tmp_path / "broker"), heartbeat_s=0.5)
    folder = write_job(tmp_path / "job")
    first = Broker(cfg)
    await first.__aenter__()

    began = asyncio.Event()

    def cut_off(peer: bytes, job_id: str, offer: object) -> None:
        began.set()
        first.lifecycle.should_exit.set()  # gone right after the stream began, as a killed broker is
        return None

    first.uploads._accept_model = cut_off  # type: ignore[method-assign]
    try:
        async with Admin(first.address, timeout=20) as admin:
            submitting = asyncio.ensure_future(admin.submit(folder))
            await asyncio.wait_for(began.wait(), 10)
            await first.__aexit__(None, None, None)
            assert not submitting.done()
            async with Broker(cfg) as second:
                assert second.store.jobs()[0]["state"] == "failed"  # the upload did not complete: until sent again
                job_id = await submitting
                async with asyncio.timeout(10):
                    while (job := second.store.job(job_id)) is None or job["state"] != "waiting":
                        await asyncio.sleep(0.02)
                assert [j["id"] for j in second.store.jobs()] == [job_id]
                assert (second.store.job_dir(job_id) / "files" / "model.safetensors").stat().st_size > 0
    finally:
        await first.__aexit__(None, None, None)
