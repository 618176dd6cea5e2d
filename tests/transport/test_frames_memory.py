"""A daemon's allocator (``fedbus._memory.tune_malloc``): the frames zmq receives reuse warm heap memory while
a window of them is held, instead of faulting in every page, and ``release_free_memory`` gives it back."""

from __future__ import annotations

import asyncio
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedbus.modelio.sources import ModelSource
from fedbus.transport import streams
from tests.transport.conftest import memory_linked

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_held_frames_reuse_warm_memory_and_a_trim_gives_it_back() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tests.transport.frames_probe"], cwd=ROOT, capture_output=True, text=True, timeout=50
    )
    assert out.returncode == 0, out.stderr[-2000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["tuned"]
    # A frame that is a mapping of its own faults in every page, every pass (the 1 MiB threshold: all 65,536).
    assert probe["faults"][1] < probe["pages"] // 4, probe
    assert probe["rss_trimmed"] < probe["rss_held"] - (32 << 20), probe  # the window's frames went back


async def test_a_hub_trims_once_its_last_stream_ends_and_enough_arrived(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    monkeypatch.setattr(streams, "TRIM_AFTER", 3 << 20)
    async with memory_linked(chunk_size=1 << 20, window=4 << 20) as (a, b):
        monkeypatch.setattr(streams, "release_free_memory", lambda: trims.append(len(b.hub._incoming)))

        async def one(numel: int) -> None:
            await asyncio.wait_for(a.hub.send(b"b", ModelSource.from_state_dict({"w": torch.ones(numel)})), 10)
            await (await b.sinks.get()).result

        await one(1 << 18)  # 1 MiB: under TRIM_AFTER, no trim
        assert trims == []
        await asyncio.gather(one(1 << 18), one(1 << 18))  # 3 MiB since the last trim: once, when both ended
        await asyncio.sleep(0)
        assert trims == [0]
        await one(1 << 20)  # 4 MiB more
        await asyncio.sleep(0)
        assert trims == [0, 0]
