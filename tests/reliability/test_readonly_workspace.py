"""What the broker acknowledged survives its file system failing before the kernel wrote back.

The workspace is a loop-mounted ext4 with ``errors=remount-ro``; mid-job an ext4 error is forced
(``/sys/fs/ext4/DEV/trigger_fs_error``): the file system goes read-only at once, and every page not yet written
back is lost, as in a power cut. The broker is killed, the file system mounted again (its journal replays, as
at boot), checked (``e2fsck -n``) and mounted once more, and the store opened as a restarted broker does: every
job whose id ``submit`` returned is there with its files, and every version status had shown is there with its
checkpoint and its updates. Root only (skipped with the reason elsewhere)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import zipfile
from pathlib import Path

import pytest

from fedbus.admin import Admin
from fedbus.modelio import serde
from tests.e2e.procs import Daemon, start_site
from tests.reliability.jobs import deterministic_job
from tests.reliability.mounts import loop_ext4

pytestmark = pytest.mark.timeout(110)
SITES = 2


def _trigger_error(point: Path) -> None:
    """Force an ext4 error on the file system mounted at ``point``: with errors=remount-ro it turns read-only."""
    source = subprocess.run(["findmnt", "-no", "SOURCE", str(point)], capture_output=True, text=True, check=True)
    trigger = Path("/sys/fs/ext4") / Path(source.stdout.strip()).name / "trigger_fs_error"
    if not trigger.exists():
        pytest.skip(f"this kernel cannot force an ext4 error ({trigger} is missing)")
    trigger.write_text("fedbus test: the disk failed\n")
    opts = subprocess.run(["findmnt", "-no", "OPTIONS", str(point)], capture_output=True, text=True, check=True)
    assert "ro" in opts.stdout.split(",") or "emergency_ro" in opts.stdout, opts.stdout


def test_every_job_and_version_the_broker_acknowledged_survives_the_file_system_failing(tmp_path: Path) -> None:
    running = deterministic_job(tmp_path / "running", sites=SITES, rounds=40, pause=0.2)
    queued = deterministic_job(tmp_path / "queued", sites=SITES, rounds=2)
    cfg = tmp_path / "broker.toml"
    cfg.write_text("heartbeat_s = 0.5\nliveness = 20\n")
    address = f"ipc://{tmp_path}/broker.sock"
    with loop_ext4(tmp_path / "disk.img", tmp_path / "ws", 64) as ws:
        args = ["broker", "--bind", address, "--workspace", str(ws / "broker"), "--config", str(cfg)]
        broker = Daemon(args, tmp_path / "broker-0.log")
        sites: list[Daemon] = []
        try:
            broker.wait_for("broker listening")
            sites = [start_site(tmp_path, f"site-{i}", address) for i in range(1, SITES + 1)]

            async def before_the_fault() -> tuple[list[str], dict]:
                async with Admin(address, timeout=30) as admin:
                    ids = [await admin.submit(running), await admin.submit(queued)]
                    async with asyncio.timeout(60):
                        while (seen := (await admin.status(ids[0]))["jobs"][0])["version"] < 2:
                            await asyncio.sleep(0.05)
                    return ids, seen

            (running_id, queued_id), seen = asyncio.run(before_the_fault())
            _trigger_error(ws)
            broker.proc.send_signal(signal.SIGKILL)  # the host goes down with the disk: nothing more is written
            broker.proc.wait(10)
        finally:
            for d in [*sites, broker]:
                d.stop()
        image = str(tmp_path / "disk.img")
        subprocess.run(["umount", str(ws)], check=True, timeout=30)
        for cmd in (["mount", "-o", "loop", image, str(ws)], ["umount", str(ws)]):  # the journal replays, as at boot
            subprocess.run(cmd, check=True, timeout=30)
        check = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        subprocess.run(["mount", "-o", "loop", image, str(ws)], check=True, timeout=30)

        from fedbus.broker.store import JobStore

        store = JobStore(ws / "broker")  # what a restarted broker reads
        try:
            for job_id, folder in ((running_id, running), (queued_id, queued)):
                job = store.job(job_id)
                assert job is not None, f"{job_id}: acknowledged by submit, missing after the fault"
                files = store.job_dir(job_id)
                with zipfile.ZipFile(files / "job.zip") as archive:
                    assert archive.testzip() is None
                for name in ("job.toml", "client.py", "model.safetensors"):
                    assert (files / "files" / name).read_bytes() == (folder / name).read_bytes(), (job_id, name)
            versions = [h["version"] for h in store.history(running_id)]
            assert versions[: seen["version"] + 1] == list(range(seen["version"] + 1)), versions
            for v in versions:
                serde.read_file(store.checkpoint_path(running_id, v))  # whole and valid
            accepted = [u for u in store.updates(running_id) if u["accepted"]]
            assert len(accepted) >= SITES * seen["version"]
        finally:
            store.close()
