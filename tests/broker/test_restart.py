"""The broker stopped mid-job and started again on the same workspace: the job resumes from its last
checkpoint once its sites are back, and finishes all its rounds."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from fedbus.admin import Admin
from fedbus.broker import Broker
from fedbus.config import BrokerConfig, SiteConfig
from fedbus.site import Site
from tests.broker.harness import wait_job, write_job

pytestmark = pytest.mark.timeout(150)


async def test_a_restarted_broker_resumes_a_running_job(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = BrokerConfig(bind=f"ipc://{tmp_path}/broker.sock", workspace=str(tmp_path / "broker"), heartbeat_s=0.5)
    sites = [
        Site(SiteConfig(name=f"site-{i}", broker=cfg.bind, workspace=str(tmp_path / f"s{i}"), heartbeat_s=0.5))
        for i in (1, 2, 3)
    ]
    async with contextlib.AsyncExitStack() as stack:
        for s in sites:
            await stack.enter_async_context(s)
        first = Broker(cfg)
        async with first, Admin(first.address) as admin:
            job_id = await admin.submit(write_job(tmp_path / "job", mode="slow", rounds=4))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while first.store.latest_version(job_id) in (None, (0, first.store.checkpoint_path(job_id, 0))):
                assert loop.time() < deadline, "no round finished"
                await asyncio.sleep(0.1)
        # the broker is gone mid-job (its second round in flight); a new one starts on the same workspace
        async with Broker(cfg) as second, Admin(second.address) as admin:
            job = await wait_job(admin, job_id, timeout=120)
            history = second.store.history(job_id)
        assert job["state"] == "finished", job["reason"]
        assert [h["version"] for h in history] == [0, 1, 2, 3, 4]
