"""``durability = "none"``: a throwaway workspace (simulations, tests) commits and acknowledges without any fsync."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from fedbus.broker import commits as commits_module
from fedbus.broker.store import JobStore
from fedbus.config import BrokerConfig
from fedbus.errors import ConfigError
from fedbus.modelio import serde


def test_the_setting_is_checked_and_full_by_default() -> None:
    assert BrokerConfig().durability == "full"
    assert BrokerConfig(durability="none").durability == "none"
    with pytest.raises(ConfigError, match="durability.*full or none"):
        BrokerConfig(durability="some")
    with pytest.raises(ValueError, match="durability must be full or none"):
        JobStore("/nonexistent-never-made", durability="off")


async def test_a_store_without_durability_commits_and_acknowledges_without_a_single_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs: list[int] = []
    real_fsync = commits_module.os.fsync
    monkeypatch.setattr(commits_module.os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr(serde.os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    store = JobStore(tmp_path, durability="none")
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 0  # OFF
    store.create_job("j", "j", {}, state="running")
    heard: list[str] = []
    store.record_update("j", "a", "s", 1, accepted=True, staleness=0, weight=1.0)
    kept = store.keep_small("j", 2, [memoryview(b"update bytes")])
    store.when_recorded(lambda: heard.append("a"))
    await store.recorded()
    await store.synced()
    assert heard == ["a"]
    path = store.write_checkpoint("j", 1, {"w": torch.ones(3)})
    store.add_version("j", 1, path, {})
    store.sync_files(store.job_dir("j"))
    await store.recorded()
    assert fsyncs == []  # nothing was synced, yet everything was committed and acknowledged
    assert Path(kept["path"]).read_bytes() == b"update bytes"
    store.close()
    with sqlite3.connect(tmp_path / "fedbus.db") as other:
        assert other.execute("SELECT task_id FROM updates").fetchall() == [("a",)]
        assert other.execute("SELECT version FROM versions").fetchall() == [(1,)]
    assert torch.equal(serde.read_file(path)["w"], torch.ones(3))


async def test_a_durable_store_still_syncs_what_it_acknowledges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs: list[int] = []
    real_fsync = commits_module.os.fsync
    monkeypatch.setattr(commits_module.os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    store = JobStore(tmp_path)
    store.create_job("j", "j", {}, state="running")
    store.record_update("j", "a", "s", 1, accepted=True, staleness=0, weight=1.0)
    store.keep_small("j", 2, [memoryview(b"update bytes")])
    await store.recorded()
    assert len(fsyncs) >= 2  # the WAL, the kept log (and its folder)
    store.close()
