"""The `fedbus` command against a real broker process: submit, status, abort, download, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.broker.harness import write_job
from tests.e2e.procs import ROOT, start_broker

pytestmark = pytest.mark.timeout(120)


def fedbus(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedbus.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_admin_commands_and_exit_codes(tmp_path: Path) -> None:
    broker, address = start_broker(tmp_path)
    try:
        job = write_job(tmp_path / "job")  # needs 3 sites: it waits, no site is connected
        sub = fedbus("submit", str(job), "--broker", address)
        assert sub.returncode == 0, sub.stderr
        job_id = sub.stdout.strip()
        status = fedbus("status", job_id, "--json", "--broker", address)
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert data["jobs"][0]["id"] == job_id and data["jobs"][0]["state"] == "waiting"
        table = fedbus("status", "--broker", address)
        assert job_id in table.stdout and "waiting" in table.stdout
        assert fedbus("abort", job_id, "--broker", address).returncode == 0
        assert (
            json.loads(fedbus("status", job_id, "--json", "--broker", address).stdout)["jobs"][0]["state"] == "aborted"
        )
        down = fedbus("download", job_id, "-o", str(tmp_path / "out"), "--broker", address)
        assert down.returncode == 0, down.stderr
        assert json.loads((tmp_path / "out/history.json").read_text())["job_id"] == job_id
        # failures: one line on stderr, exit 1, no traceback
        (job / "job.toml").write_text((job / "job.toml").read_text().replace("fedavg", "fedavgg"))
        bad = fedbus("submit", str(job), "--broker", address)
        assert bad.returncode == 1
        assert "unknown strategy 'fedavgg'" in bad.stderr and "Traceback" not in bad.stderr
        missing = fedbus("status", "no-such-job", "--broker", address)
        assert missing.returncode == 1 and "no such job" in missing.stderr
        # usage errors exit 2
        assert fedbus("frobnicate").returncode == 2
        assert fedbus("bench", "transfer", "--size-mb", "-3").returncode == 2
        assert fedbus("bench", "scale", "--sim-nice", "20").returncode == 2
    finally:
        assert broker.stop() == 0


def test_no_broker_is_a_clear_error(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "fedbus.cli", "status", "--broker", f"ipc://{tmp_path}/nobody.sock", "--timeout", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert "no answer from a broker" in res.stderr


def test_status_and_abort_load_no_torch() -> None:
    """An operator's ``fedbus status`` answers in a fraction of a second: torch (2 s of imports on a small
    machine) is loaded by the commands that move a model only."""
    code = (
        "import asyncio, sys\n"
        "from fedbus import cli\n"
        "from fedbus.admin import Admin\n"
        "assert 'torch' not in sys.modules, 'the admin client imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
