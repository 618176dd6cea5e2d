"""A whole job on a secure federation: real broker, real site daemons and training scripts, CURVE on.

Shows together, on one run (a job costs seconds of process start-up on a small machine):
* the sites' and the broker's audit logs agree on every update (same digest, same size) and every task;
* a tensor a site excludes never reaches the broker (site-imposed) and a job's own exclusion holds too;
* the site behind the relay never shows a byte of the model in plaintext on the wire;
* ``fedbus audit`` reads and filters the logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from fedbus import cli
from fedbus.admin import from_kit
from fedbus.modelio import serde
from fedbus.site import Site
from tests.broker.harness import wait_job
from tests.security.helpers import (
    Relay,
    audit_of,
    make_kits,
    patterned_model,
    secure_broker,
    site_config,
    until,
    write_job,
)

pytestmark = pytest.mark.timeout(120)


async def test_secure_job_audit_agrees_and_excluded_tensors_stay_home(tmp_path: Path, monkeypatch) -> None:
    # The sites spread their upload chunks over two connections each (a host of 8+ cores does so by default):
    # a lane carries its site's CURVE key and routing id, so the broker's checks hold for it as they do for the site.
    monkeypatch.setenv("FEDBUS_LANES", "2")
    kits = make_kits(tmp_path)
    model = patterned_model()
    job = write_job(tmp_path / "job", model, rounds=2, extra='\n[extra.privacy]\nexclude = ["private"]\n')
    async with secure_broker(tmp_path, kits) as broker, Relay(broker.address) as relay:
        # site-1 dials through the relay and imposes its own filter: "w" never leaves it
        # small chunks for site-1's uploads (digest at END), while site-2's small model rides in its offer
        one_cfg = site_config(tmp_path, kits, "site-1", relay.address, exclude_vars=("w",))
        one = Site(one_cfg, chunk_size=64 << 10, window=256 << 10)
        two = Site(site_config(tmp_path, kits, "site-2", broker.address))
        async with one, two:
            await until(lambda: broker.registry.online() == ["site-1", "site-2"], what="both sites online")
            admin = from_kit(kits / "ops", timeout=30.0)
            admin.address = broker.address
            async with admin:
                job_id = await admin.submit(job)
                state = await wait_job(admin, job_id, timeout=90.0)
                assert state["state"] == "finished", state
                result = await admin.download(job_id, tmp_path / "out")
    final = serde.read_file(result["model_path"])

    # exclusion: "private" (the job's request, at both sites) never moved from its initial zeros, although
    # each script set it to 7777+; "w" moved by half a step per round: site-1 sent the global back unchanged
    assert torch.equal(final["private"], model["private"])
    assert torch.allclose(final["w"], model["w"] + 1.0, atol=1e-5)

    # the wire between site-1 and the broker (its connection and the lane): whole models crossed it, none of their
    # bytes in plaintext
    assert relay.connections >= 2
    raw = model["w"].numpy().tobytes()
    assert len(relay.captured) > 2 * len(raw)
    for off in range(0, len(raw) - 64, len(raw) // 16):
        assert raw[off : off + 64] not in relay.captured

    # audit: every update the sites sent is one the broker received, with the same digest and size
    broker_log = tmp_path / "broker" / "audit.jsonl"
    sent = [r for s in ("site-1", "site-2") for r in audit_of(tmp_path / s / "audit.jsonl", "update_sent")]
    received = audit_of(broker_log, "update_received")
    key = lambda r: (r["job"], r["task"], r["site"], r["size"], r["digest"])  # noqa: E731
    assert len(sent) == 4 and sorted(map(key, sent)) == sorted(map(key, received))
    assert all(r["digest"] and r["job"] == job_id for r in received)
    assert {tuple(r["filters"]) for r in sent} == {("exclude(private)",), ("exclude(private)", "exclude(w)")}
    tasks_sent = audit_of(broker_log, "task_sent")
    tasks_received = [r for s in ("site-1", "site-2") for r in audit_of(tmp_path / s / "audit.jsonl", "task_received")]
    assert sorted((r["task"], r["site"], r["size"]) for r in tasks_sent) == sorted(
        (r["task"], r["site"], r["size"]) for r in tasks_received
    )
    kinds = {r["kind"] for r in audit_of(broker_log)}
    assert {"hello", "job_submitted", "job_deployed", "job_downloaded"} <= kinds
    (submitted,) = audit_of(broker_log, "job_submitted")
    assert submitted["by"] == "ops" and submitted["job"] == job_id and len(submitted["key"]) == 40

    # fedbus audit: filter by job and kind, JSON lines out
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["audit", str(broker_log), "--job", job_id, "--kind", "update_received", "--json"]) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 4 and {r["site"] for r in lines} == {"site-1", "site-2"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["audit", str(tmp_path / "site-1" / "audit.jsonl"), "--site", "site-1"]) == 0
    assert "update_sent" in out.getvalue() and "task_received" in out.getvalue()


def test_a_held_audit_file_survives_being_moved_away(tmp_path, monkeypatch) -> None:
    """The broker's audit log holds its descriptor; an operator moving the file away gets a new one within a
    second, and records before and after land in the file the path named at the time."""
    from fedbus import audit
    from fedbus.audit import AuditLog, read_audit

    clock = [100.0]
    monkeypatch.setattr(audit.time, "monotonic", lambda: clock[0])
    log = AuditLog(tmp_path / "audit.jsonl", actor="broker", hold=True)
    log.record("hello", site="a")
    (tmp_path / "audit.jsonl").rename(tmp_path / "old.jsonl")
    clock[0] += 2.0
    log.record("hello", site="b")
    log.close()
    log.record("hello", site="c")  # after close: dropped
    assert [r["site"] for r in read_audit(tmp_path / "old.jsonl")] == ["a"]
    assert [r["site"] for r in read_audit(tmp_path / "audit.jsonl")] == ["b"]


async def test_a_held_audit_file_gets_one_write_per_turn_of_the_event_loop(tmp_path, monkeypatch) -> None:
    from fedbus import audit
    from fedbus.audit import AuditLog, read_audit

    writes: list[bytes] = []
    real_write = audit.os.write
    monkeypatch.setattr(audit.os, "write", lambda fd, data: writes.append(bytes(data)) or real_write(fd, data))
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, actor="broker", hold=True)
    for site in "abc":
        log.record("hello", site=site)
    assert writes == [] and list(read_audit(path)) == []  # held until the turn ends...
    await asyncio.sleep(0)
    assert len(writes) == 1 and [r["site"] for r in read_audit(path)] == ["a", "b", "c"]  # ...then one write
    log.record("refused", site="d")
    log.flush()  # before a reply leaves: at once
    assert [r["site"] for r in read_audit(path)][-1] == "d" and len(writes) == 2
    log.record("hello", site="e")
    log.close()  # a daemon stopping writes what is left
    assert [r["site"] for r in read_audit(path)][-1] == "e"
    await asyncio.sleep(0)  # the turn's flush, after close: nothing twice
    assert [r["site"] for r in read_audit(path)] == ["a", "b", "c", "d", "e"]
