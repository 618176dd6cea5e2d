"""A site's link folders in the temp folder are named for the site (its workspace and PID), so that the next start
of a site killed with jobs running removes what it left, and only that: never a folder of a live process, never
another site's."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedbus.protocol.messages import Deploy, EndJob
from fedbus.site.folder import LINK_DIR, link_prefix
from tests.site.helpers import FakeBroker, job_archive, running_site

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def made() -> Iterator[list[Path]]:
    """Folders this test puts in the temp folder: all removed at the end, whatever the site did."""
    paths: list[Path] = []
    yield paths
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


async def test_a_site_removes_the_link_folders_its_killed_process_left_and_no_other(
    tmp_path: Path, broker: FakeBroker, made: list[Path]
) -> None:
    # A deep workspace: job folders' paths are too long for a socket, so links live in the temp folder.
    workspace = tmp_path / ("w" * 60) / ("x" * 60)
    ours, other = link_prefix(workspace), link_prefix(tmp_path / "another-site")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f"{ours}{_dead_pid()}-a1", f"{ours}{live.pid}-b2", f"{other}{_dead_pid()}-c3"):
            made.append(Path(tempfile.mkdtemp(prefix=name)))
            (made[-1] / "link.sock").write_bytes(b"")
        dead, alive, foreign = made
        async with running_site(workspace, broker.address) as site:
            assert not dead.exists()  # a killed process of this site left it
            assert alive.exists() and foreign.exists()  # a live process's, another site's
            await broker.wait_hellos(1)
            archive = job_archive(tmp_path / "job", "import time\ntime.sleep(60)\n")
            await broker.send(Deploy(job_id="j1", script="client.py", args=[]), [archive])
            await broker.expect("job_event", event="started")
            runner = site.runners["j1"]
            link_dir = runner.folder._link_dir
            assert link_dir is not None and link_dir.name.startswith(f"{ours}{os.getpid()}-")
            made.append(link_dir)
            await broker.send(EndJob("j1", "finished"))
            async with asyncio.timeout(15):
                await runner.done.wait()
            assert not link_dir.exists()  # an ended job's link folder goes with it
    finally:
        live.kill()
        live.wait()
    assert ours.startswith(LINK_DIR) and ours != other
