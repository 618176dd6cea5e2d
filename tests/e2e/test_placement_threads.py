"""Real daemons with placement threads and several zmq I/O threads (as on a machine with spare cores; CI's
two cores would leave both off): chunks written by threads while the loops route, sums computed ahead, the
sites' connections spread over the broker's I/O threads, each upload decided on the strategy thread, and
still the exact model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from fedbus.admin import Admin
from fedbus.modelio import serde
from tests.broker.harness import wait_job
from tests.e2e.procs import start_broker, start_site
from tests.reliability.jobs import deterministic_job
from tests.reliability.test_broker_restart import uninterrupted

pytestmark = pytest.mark.timeout(180)
ROUNDS = 2


def test_daemons_with_placement_threads_reach_the_exact_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FEDBUS_PLACEMENT_THREADS", "2")  # inherited by the daemons started below
    monkeypatch.setenv("FEDBUS_IO_THREADS", "3")
    job = deterministic_job(tmp_path / "job", sites=3, rounds=ROUNDS, numel=3 << 20)  # 12 MiB: six chunks
    broker, address = start_broker(tmp_path)
    sites = [start_site(tmp_path, f"site-{i}", address) for i in (1, 2, 3)]
    try:
        listening = broker.wait_for("broker listening")
        assert (listening["placement_threads"], listening["io_threads"]) == (2, 3)
        assert all(d.wait_for("site starting")["placement_threads"] == 2 for d in sites)

        async def scenario() -> tuple[str, dict]:
            async with Admin(address, timeout=60) as admin:
                job_id = await admin.submit(job)
                return job_id, await wait_job(admin, job_id, timeout=150)

        job_id, done = asyncio.run(scenario())
        assert done["state"] == "finished", done["reason"]
        final = serde.read_file(tmp_path / "broker" / "jobs" / job_id / "models" / f"v{ROUNDS}.safetensors")
        reference = uninterrupted(serde.read_file(job / "model.safetensors"), ROUNDS)
        for name, want in reference.items():
            assert torch.equal(final[name].view(torch.uint8), want.view(torch.uint8)), name
    finally:
        for d in sites:
            d.stop()
        assert broker.stop() == 0
