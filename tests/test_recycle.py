"""Recycled files (fedbus.recycle): released files are reused by the next writer, whose bytes are exact even when
the reused file was longer, and never a file that is not a plain file of the pool's folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedbus.modelio import serde
from fedbus.modelio.sinks import BufferSink
from fedbus.recycle import FilePool
from fedbus.site.folder import JobFolder
from tests.modelio.sinks import fill

pytestmark = pytest.mark.timeout(30)


def test_a_pool_keeps_released_files_up_to_its_size_and_hands_each_out_once(tmp_path: Path) -> None:
    pool = FilePool(tmp_path, keep=2)
    for name in "abc":
        (tmp_path / name).write_bytes(name.encode() * 10)
        pool.give(tmp_path / name)
    assert len(pool.free()) == 2 and not any((tmp_path / n).exists() for n in "abc")  # the third was deleted
    assert pool.take(tmp_path / "x") and pool.take(tmp_path / "y") and not pool.take(tmp_path / "z")
    assert sorted((tmp_path / n).read_bytes() for n in "xy") == [b"a" * 10, b"b" * 10]
    assert not (tmp_path / "z").exists() and pool.free() == []
    os.symlink(tmp_path / "x", tmp_path / ".free-planted")  # not a file of the pool: never taken
    assert not pool.take(tmp_path / "w")
    pool.give(tmp_path / "y")
    pool.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


async def test_writes_into_a_longer_recycled_file_are_exact(tmp_path: Path) -> None:
    pool = FilePool(tmp_path)
    big = {"w": torch.randn(50_000), "b": torch.arange(7)}
    small = {"w": torch.randn(1_000).half(), "m": torch.tensor([True, False])}
    serde.write_file(tmp_path / "big.safetensors", big, durable=False)
    inode = os.stat(tmp_path / "big.safetensors").st_ino
    pool.give(tmp_path / "big.safetensors")
    serde.write_file(tmp_path / "small.safetensors", small, durable=False, recycle=pool)
    assert os.stat(tmp_path / "small.safetensors").st_ino == inode  # the big file's pages, cut to size
    assert os.path.getsize(tmp_path / "small.safetensors") == serde.layout(small).total
    back = serde.read_file(tmp_path / "small.safetensors")
    assert all(torch.equal(back[k], small[k]) for k in small)

    # A model received into a recycled (longer) file through its mapping, as a site's downloads are.
    pool.give(tmp_path / "small.safetensors")
    serde.write_file(tmp_path / "big.safetensors", big, durable=False)
    pool.give(tmp_path / "big.safetensors")
    lay = serde.layout(small)
    target = tmp_path / "inbox.safetensors"
    assert pool.take(target)
    got = fill(BufferSink(max_total=1 << 30, path=str(target)), lay)
    assert all(torch.equal(got[k], small[k]) for k in small)
    assert os.path.getsize(target) == lay.total and serde.read_file(target).keys() == small.keys()


def test_a_site_recycles_task_files_unless_a_result_has_another_link(tmp_path: Path) -> None:
    folder = JobFolder(tmp_path / "job")
    folder.prepare()
    for task in ("t1", "t2"):
        folder.take_inbox_file(task).write_bytes(b"model")
        folder.outbox_file(task).write_bytes(b"result")
    os.link(folder.outbox_file("t2"), tmp_path / "kept-for-resume")  # an upload that may still be resumed
    folder.remove_task_files("t1")
    folder.remove_task_files("t2")
    free = {box: [p for p in box.iterdir() if p.name.startswith(".free-")] for box in (folder.inbox, folder.outbox)}
    assert len(free[folder.inbox]) == 2 and len(free[folder.outbox]) == 1  # t2's result is not reused
    assert [p.read_bytes() for p in free[folder.outbox]] == [b"result"]
    assert (tmp_path / "kept-for-resume").read_bytes() == b"result"
    assert folder.take_inbox_file("t3").read_bytes() == b"model"  # a released model file, to be overwritten
    # A script that takes its model files sends them back as results: released, they go to the box with fewer
    # spare files, here the inbox, which the downloads draw on.
    folder.take_inbox_file("t4")  # the inbox's last spare file
    folder.outbox_file("t5").write_bytes(b"taken model, sent back")
    folder.remove_task_files("t5")
    assert [p.read_bytes() for p in folder.inbox.iterdir() if p.name.startswith(".free-")] == [
        b"taken model, sent back"
    ]
