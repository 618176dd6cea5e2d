"""The client API against a fake site link: real zmq over ipc, the client's blocking calls in a thread."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import zmq.asyncio

import fedbus.client as flare
from fedbus.client import ClientSession, FLModel, ParamsType
from fedbus.errors import ConfigError, JobError, LocalProtocolError
from fedbus.modelio import serde
from fedbus.protocol.messages import Bye, EndJob, Error, Hello, JobEvent, Reply, Result
from tests.client.helpers import JOB, TOKEN, FakeSite, sample_params

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[FakeSite]:
    ctx = zmq.asyncio.Context()
    fake = FakeSite(ctx, tmp_path)
    try:
        yield fake
    finally:
        fake.close()
        ctx.destroy(linger=0)


async def connected(site: FakeSite, **kwargs: object) -> ClientSession:
    session = site.session(**kwargs)
    await asyncio.gather(asyncio.to_thread(session.init), site.accept())
    return session


async def answer_result(site: FakeSite, ok: bool = True, error: str = "") -> Result:
    """Read the script's result and confirm it, as a site does after the broker acknowledged the upload."""
    inc = await site.recv()
    assert isinstance(inc.msg, Result), inc.msg
    await site.send(Reply(rid=0, ok=ok, error=error))
    return inc.msg


async def send_answered(site: FakeSite, session: ClientSession, model: FLModel, timeout: float = 5) -> Result:
    """``session.send(model)`` in a thread, the site reading the result and confirming it; returns the result."""
    sending = asyncio.create_task(asyncio.to_thread(session.send, model))
    result = await answer_result(site)
    await asyncio.wait_for(sending, timeout)
    return result


async def test_round_trip_train_then_end(site: FakeSite) -> None:
    session = await connected(site)
    try:
        sent = sample_params()
        await site.push_task("t1", sent, params_type="FULL", note="hi")
        assert await asyncio.to_thread(session.is_running)
        assert session.get_task_name() == "train" and session.is_train() and not session.is_evaluate()
        model = await asyncio.to_thread(session.receive)
        assert model is not None and model.current_round == 4 and model.total_rounds == 10
        assert model.meta["version"] == 4 and model.meta["note"] == "hi" and model.meta["params_type"] == "FULL"
        assert "path" not in model.meta and "take" not in model.meta  # what the site tells the script is not meta
        for k, v in sent.items():
            assert torch.equal(model.params[k], v) and model.params[k].device.type == "cpu"

        out = FLModel(params={k: v + 1 for k, v in model.params.items()}, metrics={"loss": np.float32(0.5)})
        out.meta[flare.NUM_STEPS_CURRENT_ROUND] = 12
        result = await send_answered(site, session, out)
        assert (result.job_id, result.task_id, result.version, result.params_type) == (JOB, "t1", 4, "FULL")
        assert result.weight == 12.0 and result.metrics == {"loss": 0.5} and result.sid is None
        assert result.meta == {flare.NUM_STEPS_CURRENT_ROUND: 12} and result.train_s is not None
        path = Path(result.path)
        assert path == site.folder / "job" / "outbox" / "t1.safetensors"
        back = serde.read_file(path)
        for k, v in sent.items():
            assert torch.equal(back[k], v + 1) and back[k].dtype == v.dtype

        await site.send(EndJob(JOB, "finished"))
        assert not await asyncio.to_thread(session.is_running)
        assert await asyncio.to_thread(session.receive) is None
    finally:
        session.close()


async def test_send_waits_for_the_reply_and_raises_on_refusal(site: FakeSite) -> None:
    session = await connected(site)
    try:
        await site.push_task("t1", sample_params())
        await asyncio.to_thread(session.receive)
        sending = asyncio.create_task(asyncio.to_thread(session.send, FLModel(params=sample_params())))
        await site.recv()
        await asyncio.sleep(0.3)
        assert not sending.done()  # no reply yet: the update is not safe at the broker yet
        await site.send(Reply(rid=0, ok=False, error="privacy filter clip_norm failed"))
        with pytest.raises(JobError, match="privacy filter clip_norm failed"):
            await asyncio.wait_for(sending, 5)
    finally:
        session.close()


async def test_a_lost_update_is_logged_and_the_script_carries_on(site: FakeSite) -> None:
    session = await connected(site)
    try:
        await site.push_task("t1", sample_params())
        await asyncio.to_thread(session.receive)
        sending = asyncio.create_task(asyncio.to_thread(session.send, FLModel(params=sample_params())))
        await site.recv()
        await site.send(Reply(rid=0, ok=False, data={"lost": True}, error="stream failed: peer aborted: refused"))
        await asyncio.wait_for(sending, 5)  # returns: a lost update is routine, not a reason to crash
        await site.send(EndJob(JOB, "finished"))
        assert not await asyncio.to_thread(session.is_running)
    finally:
        session.close()


async def test_full_is_converted_to_diff_when_the_strategy_wants_deltas(site: FakeSite) -> None:
    session = await connected(site)
    try:
        received = sample_params()
        await site.push_task("t1", received, params_type="DIFF")
        model = await asyncio.to_thread(session.receive)
        local = {k: v * 3 for k, v in model.params.items()}
        result = await send_answered(site, session, FLModel(params=local))
        assert result.params_type == "DIFF"
        back = serde.read_file(result.path)
        for k, v in received.items():
            assert torch.equal(back[k], v * 3 - v)
    finally:
        session.close()


async def test_diff_is_against_the_received_model_even_if_the_script_trained_it_in_place(site: FakeSite) -> None:
    session = await connected(site)
    try:
        received = sample_params()
        await site.push_task("t1", received, params_type="DIFF")
        model = await asyncio.to_thread(session.receive)
        for v in model.params.values():
            v.add_(1)  # training the received tensors themselves
        result = await send_answered(site, session, FLModel(params=model.params))
        back = serde.read_file(result.path)
        for k, v in received.items():
            torch.testing.assert_close(back[k], torch.ones_like(v))  # (x + 1) - x, rounded: not zeros
    finally:
        session.close()


def _boxed(site: FakeSite, prefix: str) -> list[Path]:
    return sorted(p for p in (site.folder / "inbox").iterdir() if p.name.startswith(prefix))


async def _given_back(site: FakeSite) -> None:
    """Wait (bounded) for the held file to leave: the worker thread that ran ``send`` drops its arguments, the
    last references to the received tensors, just after the call returns."""
    async with asyncio.timeout(5):
        while _boxed(site, ".held-"):
            await asyncio.sleep(0.01)


async def test_a_taken_model_trained_in_place_is_sent_as_the_very_file(site: FakeSite) -> None:
    session = await connected(site)
    try:
        received = sample_params()
        await site.push_task("t1", received, take=True)
        model = await asyncio.to_thread(session.receive)
        assert not (site.folder / "inbox" / "t1.safetensors").exists()  # taken: out of the site's reach
        [held] = _boxed(site, ".held-")
        for v in model.params.values():
            if v.is_floating_point():
                v.add_(1)
        assert torch.equal(serde.read_file(held)["fc.weight"], received["fc.weight"] + 1)  # the tensors are the file
        result = await send_answered(site, session, FLModel(params=model.params))
        out = Path(result.path)
        assert out.stat().st_ino == held.stat().st_ino and out.stat().st_nlink == 2  # linked, not written
        back = serde.read_file(out)
        assert torch.equal(back["fc.bias"], received["fc.bias"] + 1) and int(back["bn.num_batches_tracked"]) == 7
        # the site is done with the result; once the script drops the tensors, the file is recycled
        out.unlink()
        del model, v
        await _given_back(site)
        assert len(_boxed(site, ".free-")) == 1
    finally:
        session.close()


async def test_a_module_that_trains_the_received_tensors_sends_them_without_a_write(site: FakeSite) -> None:
    # what docs/client-api.md shows: load_state_dict(assign=True), an optimizer step, state_dict() sent back
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    session = await connected(site)
    try:
        await site.push_task("t1", {k: v.clone() for k, v in net.state_dict().items()}, take=True)
        model = await asyncio.to_thread(session.receive)
        net.load_state_dict(model.params, assign=True)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        net(torch.randn(8, 3)).square().sum().backward()
        opt.step()
        result = await send_answered(site, session, FLModel(params=net.state_dict()))
        out = Path(result.path)
        assert out.stat().st_nlink == 2  # the taken file, linked: nothing written
        back = serde.read_file(out)
        assert set(back) == set(net.state_dict())
        for k, v in net.state_dict().items():
            assert torch.equal(back[k], v), k
        assert int(back["1.num_batches_tracked"]) == 1  # buffers too: updated in place by the forward pass
    finally:
        session.close()


async def test_a_taken_model_is_left_alone_when_other_tensors_are_sent(site: FakeSite) -> None:
    session = await connected(site)
    try:
        received = sample_params()
        await site.push_task("t1", received, take=True)
        model = await asyncio.to_thread(session.receive)
        replaced = dict(model.params, **{"fc.weight": model.params["fc.weight"] * 2})  # one tensor is new
        result = await send_answered(site, session, FLModel(params=replaced))
        out = Path(result.path)
        assert out.stat().st_nlink == 1  # written
        assert torch.equal(serde.read_file(out)["fc.weight"], received["fc.weight"] * 2)
        [held] = _boxed(site, ".held-")
        assert torch.equal(
            serde.read_file(held)["fc.weight"], received["fc.weight"]
        )  # the received tensors, as they were
        del model, replaced
        await _given_back(site)
    finally:
        session.close()


async def test_a_model_the_site_does_not_let_go_is_read_and_its_file_left_intact(site: FakeSite) -> None:
    session = await connected(site)
    try:
        received = sample_params()
        await site.push_task("t1", received)  # no "take": the site reads the file again (a privacy filter's base)
        model = await asyncio.to_thread(session.receive)
        model.params["fc.weight"].add_(1)
        assert _boxed(site, ".held-") == []
        on_disk = serde.read_file(site.folder / "inbox" / "t1.safetensors")
        assert torch.equal(on_disk["fc.weight"], received["fc.weight"])
    finally:
        session.close()


async def test_a_diff_is_computed_into_the_taken_file_which_is_then_the_result(site: FakeSite) -> None:
    session = await connected(site)
    try:
        received = sample_params()
        await site.push_task("t1", received, take=True, params_type="DIFF")
        model = await asyncio.to_thread(session.receive)
        [held] = _boxed(site, ".held-")
        inode = held.stat().st_ino
        for v in model.params.values():
            v.add_(3)  # the script trains a copy: the taken file stays the base
        assert torch.equal(serde.read_file(held)["fc.weight"], received["fc.weight"])
        local = dict(model.params)
        result = await send_answered(site, session, FLModel(params=local))
        assert result.params_type == "DIFF"
        out = Path(result.path)
        assert out.stat().st_ino == inode  # the base became the difference: nothing written
        assert _boxed(site, ".held-") == []  # the base's mapping is gone: only the outbox's link is left
        back = serde.read_file(out)
        for k, v in received.items():  # exactly what diff_params gives: local - received, in local's dtype
            assert torch.equal(back[k], torch.sub(local[k], v)) and back[k].dtype == v.dtype, k

        # a result that cannot go into the file (a bool tensor has no difference) is refused as before
        await site.push_task("t2", {"flag": torch.tensor([True, False])}, take=True, params_type="DIFF")
        model = await asyncio.to_thread(session.receive)
        with pytest.raises(ConfigError, match="bool tensor"):
            await asyncio.to_thread(session.send, FLModel(params=model.params))
    finally:
        session.close()


async def test_a_taken_file_the_site_took_back_is_a_clear_error(site: FakeSite) -> None:
    session = await connected(site)
    try:
        await site.push_task("t1", sample_params(), take=True)
        (site.folder / "inbox" / "t1.safetensors").unlink()  # the task timed out at the site meanwhile
        with pytest.raises(JobError, match="is missing"):
            await asyncio.to_thread(session.receive)
        await site.push_task("t2", sample_params(), take=True)
        (site.folder / "inbox" / "t2.safetensors").write_bytes(b"\xff" * 64)  # not a safetensors file
        session._current = None  # t1 is unanswerable; go on to t2
        with pytest.raises(JobError, match="cannot read model file"):
            await asyncio.to_thread(session.receive)
        assert _boxed(site, ".held-") == []  # a refused file is not kept
    finally:
        session.close()


async def test_explicit_diff_and_numpy_params_travel_as_given(site: FakeSite) -> None:
    session = await connected(site)
    try:
        await site.push_task("t1", sample_params())
        await asyncio.to_thread(session.receive)
        delta = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array([1, 2], dtype=np.int64)}
        model = FLModel(params=delta, params_type="DIFF")
        result = await send_answered(site, session, model)
        assert result.params_type == "DIFF" and result.weight == 1.0
        back = serde.read_file(result.path)
        assert torch.equal(back["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
        assert torch.equal(back["n"], torch.tensor([1, 2]))
    finally:
        session.close()


async def test_evaluation_sends_metrics_only(site: FakeSite) -> None:
    session = await connected(site)
    try:
        await site.push_task("e1", sample_params(), kind="evaluate")
        assert await asyncio.to_thread(session.is_running)
        assert session.is_evaluate() and session.get_task_name() == "evaluate"
        model = await asyncio.to_thread(session.receive)
        metrics = {"acc": torch.tensor(0.75), "per_class": np.array([1.0, 0.5])}
        reply = FLModel(params=model.params, metrics=metrics)  # params are ignored for an evaluation
        result = await send_answered(site, session, reply)
        assert result.metrics == {"acc": 0.75, "per_class": [1.0, 0.5]}
        assert "path" not in result.meta and not (site.folder / "job" / "outbox" / "e1.safetensors").exists()
    finally:
        session.close()


async def test_tasks_pushed_during_send_are_kept(site: FakeSite) -> None:
    session = await connected(site)
    try:
        await site.push_task("t1", sample_params())
        await asyncio.to_thread(session.receive)
        sending = asyncio.create_task(asyncio.to_thread(session.send, FLModel(params=sample_params())))
        await site.recv()
        await site.push_task("t2", sample_params())  # the next task overtakes the reply
        await site.send(Reply(rid=0, ok=True))
        await asyncio.wait_for(sending, 5)
        model = await asyncio.to_thread(session.receive)
        assert model.meta["task_id"] == "t2"
    finally:
        session.close()


async def test_receive_times_out_and_end_job_during_training_ends_the_loop(site: FakeSite) -> None:
    session = await connected(site)
    try:
        start = time.monotonic()
        assert await asyncio.to_thread(session.receive, 0.3) is None
        assert 0.25 < time.monotonic() - start < 3
        await site.push_task("t1", sample_params())
        assert (await asyncio.to_thread(session.receive)) is not None
        await site.send(EndJob(JOB, "aborted"))  # arrives while the script trains
        # While a task is in hand, is_running() answers from what has arrived so far: ask until it has.
        deadline = time.monotonic() + 5
        while await asyncio.to_thread(session.is_running):
            assert time.monotonic() < deadline, "end_job never reached the script"
            await asyncio.sleep(0.02)
        await asyncio.wait_for(asyncio.to_thread(session.send, FLModel(params=sample_params())), 5)
        with pytest.raises(TimeoutError):  # nothing was sent for the finished job
            await site.recv(timeout=0.3)
    finally:
        session.close()


async def test_log_is_a_job_event(site: FakeSite) -> None:
    session = await connected(site)
    try:
        await asyncio.to_thread(session.log, "loss", torch.tensor(0.25), 3)
        inc = await site.recv()
        assert inc.msg == JobEvent(job_id=JOB, event="log", data={"key": "loss", "value": 0.25, "step": 3})
    finally:
        session.close()


async def test_wrong_token_is_refused(site: FakeSite) -> None:
    session = site.session(token="wrong")

    async def refuse() -> None:
        inc = await site.recv()
        assert isinstance(inc.msg, Hello) and inc.msg.session == "wrong"
        await site.ep.send(inc.peer, Error("bad_token", "wrong role or link token", "hello"))

    with pytest.raises(JobError, match="bad_token"):
        await asyncio.gather(asyncio.to_thread(session.init), refuse())


async def test_a_closed_link_is_noticed(site: FakeSite) -> None:
    session = await connected(site, link_timeout=0.5)
    try:
        site.close()
        (site.folder / "link.sock").unlink(missing_ok=True)
        start = time.monotonic()
        with pytest.raises(JobError, match="no connection to the site"):
            await asyncio.to_thread(session.is_running)
        assert time.monotonic() - start < 5
    finally:
        session.close()


async def test_bye_from_the_site_ends_waits(site: FakeSite) -> None:
    session = await connected(site)
    try:
        waiting = asyncio.create_task(asyncio.to_thread(session.is_running))
        await site.send(Bye("site shutting down"))
        with pytest.raises(JobError, match="site shutting down"):
            await asyncio.wait_for(waiting, 5)
    finally:
        session.close()


async def test_misuse_and_bad_values(site: FakeSite) -> None:
    session = site.session()
    with pytest.raises(LocalProtocolError, match="init"):
        session.is_running()
    session = await connected(site)
    try:
        with pytest.raises(LocalProtocolError, match="without a task"):
            session.send(FLModel(params=sample_params()))
        await site.push_task("t1", sample_params())
        await asyncio.to_thread(session.receive)
        with pytest.raises(ConfigError, match=r"params\['w'\]"):
            session.send(FLModel(params={"w": [1.0, 2.0]}))
        with pytest.raises(ConfigError, match="mapping"):
            session.send(FLModel(params=[torch.zeros(1)]))  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="not finite"):
            session.send(FLModel(metrics={"loss": float("nan")}))
    finally:
        session.close()


async def test_module_functions_use_the_environment(site: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "FEDBUS_LINK": site.address,
        "FEDBUS_LINK_TOKEN": TOKEN,
        "FEDBUS_JOB_ID": JOB,
        "FEDBUS_SITE_NAME": "site-a",
        "FEDBUS_SITE_INDEX": "1",
        "FEDBUS_NUM_SITES": "3",
        "FEDBUS_WORKSPACE": str(site.folder / "job"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        await asyncio.gather(asyncio.to_thread(flare.init), site.accept())
        assert flare.get_site_name() == "site-a" and flare.get_job_id() == JOB
        assert flare.system_info() == {
            "site_name": "site-a",
            "job_id": JOB,
            "site_index": 1,
            "num_sites": 3,
            "workspace": str(site.folder / "job"),
        }
        with pytest.raises(ConfigError, match="rank 0"):
            flare.init(rank=1)
    finally:
        flare.shutdown()
    monkeypatch.delenv("FEDBUS_LINK")
    with pytest.raises(ConfigError, match="FEDBUS_LINK"):
        flare.init()


def test_public_api_is_pinned() -> None:
    assert sorted(flare.__all__) == sorted(
        [
            "NUM_STEPS_CURRENT_ROUND",
            "ClientSession",
            "DataKind",
            "ExchangeFormat",
            "FLMetaKey",
            "FLModel",
            "NPConstants",
            "ParamsType",
            "TransferType",
            "get_config",
            "get_job_id",
            "get_site_name",
            "get_task_name",
            "init",
            "is_evaluate",
            "is_running",
            "is_submit_model",
            "is_train",
            "log",
            "receive",
            "send",
            "shutdown",
            "system_info",
        ]
    )
    assert all(hasattr(flare, name) for name in flare.__all__)
    assert FLModel().params_type is ParamsType.FULL and ParamsType.DIFF == "DIFF"
    with pytest.raises(ConfigError):
        FLModel(params_type="HALF")
    from fedbus.client import config, tracking

    assert config.__all__ == ["ExchangeFormat", "TransferType"]
    assert sorted(tracking.__all__) == ["MLflowWriter", "SummaryWriter", "WandBWriter"]


def test_flares_constants_have_flares_values() -> None:
    """The values FLARE scripts and jobs compare against, spelled as FLARE spells them."""
    assert (flare.DataKind.WEIGHTS, flare.DataKind.WEIGHT_DIFF, flare.DataKind.METRICS) == (
        "WEIGHTS",
        "WEIGHT_DIFF",
        "METRICS",
    )
    assert (flare.TransferType.FULL, flare.TransferType.DIFF) == ("FULL", "DIFF")
    assert (flare.ExchangeFormat.NUMPY, flare.ExchangeFormat.PYTORCH, flare.ExchangeFormat.RAW) == (
        "numpy",
        "pytorch",
        "raw",
    )
    assert flare.NPConstants.NUMPY_KEY == "numpy_key"
    key = flare.FLMetaKey
    assert (key.NUM_STEPS_CURRENT_ROUND, key.CURRENT_ROUND, key.TOTAL_ROUNDS) == (
        "NUM_STEPS_CURRENT_ROUND",
        "current_round",
        "total_rounds",
    )
    assert (key.JOB_ID, key.SITE_NAME, key.INITIAL_METRICS) == ("job_id", "site_name", "initial_metrics")
    assert flare.NUM_STEPS_CURRENT_ROUND == key.NUM_STEPS_CURRENT_ROUND
    full = FLModel(params={"w": np.zeros(2)}, metrics={"acc": 1.0}, current_round=2, total_rounds=5)
    assert (full.current_round, full.total_rounds, full.meta, full.metrics) == (2, 5, {}, {"acc": 1.0})
    assert repr(full) == "FLModel(params=1 arrays, params_type=FULL, metrics=['acc'], current_round=2, total_rounds=5)"


def test_import_loads_no_broker_or_strategy_code() -> None:
    code = (
        "import sys, fedbus.client\n"
        "bad = [m for m in sys.modules if m.startswith(('fedbus.broker', 'fedbus.strategy', 'fedbus.site'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


ORPHAN = """
import pathlib, sys, time
from fedbus.client._link import ParentWatch
import os
ParentWatch(os.getppid(), interval=0.1, kill_after=1.0)
pathlib.Path(sys.argv[1]).write_text(str(os.getpid()))
time.sleep(120)  # training, deaf to the link
"""

SITE = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True)
time.sleep(120)
"""


def test_a_script_whose_site_died_ends_itself(tmp_path: Path) -> None:
    ready = tmp_path / "pid"
    site = subprocess.Popen([sys.executable, "-c", SITE, ORPHAN, str(ready)])
    try:
        deadline = time.monotonic() + 40
        while not ready.exists() or not ready.read_text():
            assert time.monotonic() < deadline and site.poll() is None
            time.sleep(0.05)
        pid = int(ready.read_text())
        site.kill()  # the site dies without a word
        site.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _running(pid):
            time.sleep(0.05)
        assert not _running(pid)
    finally:
        if site.poll() is None:
            site.kill()
            site.wait()


@pytest.mark.parametrize("reaped", [True, False])
def test_a_script_whose_site_died_before_init_knows_at_once(tmp_path: Path, reaped: bool) -> None:
    """Orphaned while it imported torch, the script has a new parent already, so the parent-PID check cannot
    tell; the site's PID (``FEDBUS_SITE_PID``) can, reaped or a zombie still. Before, init waited out the link
    timeout (30 s)."""
    site = subprocess.Popen([sys.executable, "-c", "pass"])
    if reaped:
        site.wait()
    else:  # exited, not yet reaped by its parent
        os.waitid(os.P_PID, site.pid, os.WEXITED | os.WNOWAIT)
    env = {
        "FEDBUS_LINK": f"ipc://{tmp_path}/link.sock",
        "FEDBUS_LINK_TOKEN": "t",
        "FEDBUS_JOB_ID": JOB,
        "FEDBUS_SITE_NAME": "site-a",
        "FEDBUS_SITE_INDEX": "0",
        "FEDBUS_NUM_SITES": "1",
        "FEDBUS_WORKSPACE": str(tmp_path),
        "FEDBUS_SITE_PID": str(site.pid),
    }
    try:
        session = ClientSession.from_env(env)
        with pytest.raises(JobError, match="the site process is gone"):
            session.init()
    finally:
        site.wait()
    with pytest.raises(ConfigError, match="FEDBUS_SITE_PID"):
        ClientSession.from_env({**env, "FEDBUS_SITE_PID": "one"})


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
async def test_cuda_params_travel_through_send_as_cpu_tensors(site: FakeSite) -> None:
    session = await connected(site)
    try:
        received = sample_params()
        await site.push_task("t1", received, params_type="DIFF")
        model = await asyncio.to_thread(session.receive)
        assert all(t.device.type == "cpu" for t in model.params.values())  # receive() hands out CPU tensors
        on_gpu = {k: (v.cuda() * 2 if v.is_floating_point() else v.cuda()) for k, v in model.params.items()}
        result = await send_answered(site, session, FLModel(params=on_gpu), timeout=10)
        back = serde.read_file(result.path)  # FULL CUDA params became a CPU delta file
        for k, v in received.items():
            want = v * 2 - v if v.is_floating_point() else v - v
            assert back[k].device.type == "cpu" and torch.equal(back[k], want), k
    finally:
        session.close()
