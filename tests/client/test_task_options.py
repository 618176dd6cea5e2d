"""What ``Task.options`` asks of the client API, against a fake site link (real zmq over ipc): numpy exchange, DIFF
transfer, memory_gc_rounds, submit_model tasks, SCAFFOLD's controls, FLARE's meta keys and get_config()."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq.asyncio

import fedbus.client as flare
from fedbus.client import FLMetaKey, FLModel, NPConstants
from fedbus.client.options import TaskOptions
from fedbus.client.scaffold import ScaffoldHelper
from fedbus.errors import ConfigError, JobError
from fedbus.modelio import serde
from tests.client.helpers import JOB, FakeSite, sample_params
from tests.client.test_api import connected, send_answered

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


def test_options_parse_with_defaults_and_name_the_bad_key() -> None:
    assert TaskOptions.parse({}) == TaskOptions() == TaskOptions.parse(None)
    opts = TaskOptions.parse(
        {"exchange": "numpy", "transfer_type": "DIFF", "memory_gc_rounds": 2, "fedprox_mu": 1, "scaffold": True}
    )
    assert (opts.exchange, opts.transfer_type, opts.memory_gc_rounds, opts.fedprox_mu) == ("numpy", "DIFF", 2, 1.0)
    assert opts.scaffold and not opts.submit_model
    assert TaskOptions.parse({"future_knob": 3}) == TaskOptions()  # unknown keys are ignored
    for bad, key in [
        ({"exchange": "keras"}, "exchange"),
        ({"transfer_type": "HALF"}, "transfer_type"),
        ({"memory_gc_rounds": -1}, "memory_gc_rounds"),
        ({"memory_gc_rounds": True}, "memory_gc_rounds"),
        ({"fedprox_mu": float("nan")}, "fedprox_mu"),
        ({"scaffold": "yes"}, "scaffold"),
    ]:
        with pytest.raises(ConfigError, match=f"'{key}'"):
            TaskOptions.parse(bad)


async def test_numpy_exchange_end_to_end(site: FakeSite) -> None:
    session = await connected(site)
    try:
        start = {NPConstants.NUMPY_KEY: torch.arange(9, dtype=torch.float32).reshape(3, 3)}
        await site.push_task("t1", start, options={"exchange": "numpy"})
        model = await asyncio.to_thread(session.receive)
        arr = model.params[NPConstants.NUMPY_KEY]
        assert isinstance(arr, np.ndarray) and arr.dtype == np.float32 and arr.shape == (3, 3)
        assert np.array_equal(arr, np.arange(9, dtype=np.float32).reshape(3, 3))
        # numpy arithmetic widens to float64 here: the dtype that arrived is what travels back
        new = arr + np.float64(1.5) * np.ones((3, 3))
        assert new.dtype == np.float64
        result = await send_answered(session=session, site=site, model=FLModel(params={NPConstants.NUMPY_KEY: new}))
        back = serde.read_file(result.path)[NPConstants.NUMPY_KEY]
        assert back.dtype == torch.float32 and torch.equal(back, start[NPConstants.NUMPY_KEY] + 1.5)

        # an integer model made float keeps the float: the server judges it, nothing is truncated here
        await site.push_task("t2", {"n": torch.tensor([1, 2])}, options={"exchange": "numpy"})
        model = await asyncio.to_thread(session.receive)
        result = await send_answered(site, session, FLModel(params={"n": model.params["n"] * 0.5}))
        assert torch.equal(serde.read_file(result.path)["n"], torch.tensor([0.5, 1.0], dtype=torch.float64))

        # an evaluation of a numpy model gets numpy too, and answers with metrics only
        await site.push_task("e1", start, kind="evaluate", options={"exchange": "numpy"})
        model = await asyncio.to_thread(session.receive)
        assert isinstance(model.params[NPConstants.NUMPY_KEY], np.ndarray)
        result = await send_answered(site, session, FLModel(metrics={"weight_mean": np.mean(arr)}))
        assert result.metrics == {"weight_mean": 4.0} and "path" not in result.meta
    finally:
        session.close()


@pytest.mark.parametrize("take", [False, True])
async def test_diff_transfer_turns_a_full_result_into_local_minus_received(site: FakeSite, take: bool) -> None:
    session = await connected(site)
    try:
        received = {NPConstants.NUMPY_KEY: torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)}
        await site.push_task("t1", received, take=take, options={"exchange": "numpy", "transfer_type": "DIFF"})
        model = await asyncio.to_thread(session.receive)
        arr = model.params[NPConstants.NUMPY_KEY]
        arr += 1  # trained in place: the base is still what arrived
        result = await send_answered(site, session, FLModel(params={NPConstants.NUMPY_KEY: arr * 2}))
        assert result.params_type == "DIFF"
        back = serde.read_file(result.path)[NPConstants.NUMPY_KEY]
        assert torch.equal(back, (received[NPConstants.NUMPY_KEY] + 1) * 2 - received[NPConstants.NUMPY_KEY])

        # a script that sends its own DIFF is passed through
        await site.push_task("t2", received, take=take, options={"exchange": "numpy", "transfer_type": "DIFF"})
        model = await asyncio.to_thread(session.receive)
        own = np.full((2, 2), 0.25)
        result = await send_answered(site, session, FLModel(params={NPConstants.NUMPY_KEY: own}, params_type="DIFF"))
        assert result.params_type == "DIFF"
        back = serde.read_file(result.path)[NPConstants.NUMPY_KEY]
        assert torch.equal(back, torch.full((2, 2), 0.25, dtype=torch.float64))
    finally:
        session.close()


async def test_memory_gc_rounds_collects_every_n_training_results(
    site: FakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    collected: list[int] = []
    real = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(1) or real(*a))
    session = await connected(site)
    try:
        after: list[int] = []
        for i in range(5):
            await site.push_task(f"t{i}", sample_params(), options={"memory_gc_rounds": 2})
            model = await asyncio.to_thread(session.receive)
            await send_answered(site, session, FLModel(params=model.params))
            assert session._received is None and session._taken is None  # nothing of the task is held
            after.append(len(collected))
        assert after == [0, 1, 1, 2, 2]  # after the 2nd and the 4th result
        await site.push_task("e1", sample_params(), kind="evaluate", options={"memory_gc_rounds": 1})
        await asyncio.to_thread(session.receive)
        await send_answered(site, session, FLModel(metrics={"acc": 1.0}))
        assert len(collected) == 2  # evaluations are not rounds
    finally:
        session.close()


async def test_submit_model_task_sends_the_local_model_as_full(site: FakeSite) -> None:
    session = await connected(site)
    try:
        await site.push_task("s1", None, kind="submit_model", params_type="DIFF", options={"transfer_type": "DIFF"})
        assert await asyncio.to_thread(session.is_running)
        assert session.is_submit_model() and not session.is_train() and not session.is_evaluate()
        assert session.get_task_name() == "submit_model"
        model = await asyncio.to_thread(session.receive)
        assert model.params is None and model.current_round == 4
        with pytest.raises(ConfigError, match="not a DIFF"):
            session.send(FLModel(params=sample_params(), params_type="DIFF"))
        local = sample_params()
        result = await send_answered(site, session, FLModel(params=local))
        assert result.params_type == "FULL"  # the model itself, never a difference, whatever the job's transfer type
        back = serde.read_file(result.path)
        assert all(torch.equal(back[k], v) for k, v in local.items())

        # the options' flag names a submit_model task too
        await site.push_task("s2", None, options={"submit_model": True})
        assert await asyncio.to_thread(session.is_running)
        assert session.is_submit_model() and not session.is_train()
        await asyncio.to_thread(session.receive)
        declined = await send_answered(site, session, FLModel(metrics={}))  # a site with no local model declines
        assert "path" not in declined.meta
    finally:
        session.close()


async def test_meta_carries_flares_keys_and_get_config(site: FakeSite) -> None:
    session = await connected(site)
    try:
        assert session.get_config()["TASK_EXCHANGE"]["exchange_format"] == "pytorch"
        await site.push_task("t1", sample_params(), options={"exchange": "numpy", "transfer_type": "DIFF"})
        model = await asyncio.to_thread(session.receive)
        assert model.meta[FLMetaKey.CURRENT_ROUND] == model.current_round == 4
        assert model.meta[FLMetaKey.TOTAL_ROUNDS] == model.total_rounds == 10
        assert model.meta[FLMetaKey.JOB_ID] == JOB and model.meta[FLMetaKey.SITE_NAME] == "site-a"
        config = session.get_config()
        assert config["site_name"] == "site-a" and config["job_id"] == JOB
        assert config["TASK_EXCHANGE"]["exchange_format"] == "numpy"
        assert config["TASK_EXCHANGE"]["transfer_type"] == "DIFF"
        assert "tensors" not in repr(model) and "3 arrays" in repr(model)  # a summary, never the arrays
    finally:
        session.close()


def _scaffold_model(c: float) -> dict[str, torch.Tensor]:
    return {
        "w": torch.tensor([1.0, 2.0]),
        "steps": torch.tensor(3),
        "scaffold.c.w": torch.tensor([c, -c]),
    }


async def test_scaffold_controls_are_stripped_kept_and_their_deltas_sent(site: FakeSite) -> None:
    session = await connected(site)
    helper = ScaffoldHelper(session)
    try:
        await site.push_task("t1", _scaffold_model(0.5), params_type="DIFF", options={"scaffold": True})
        model = await asyncio.to_thread(session.receive)
        assert set(model.params) == {"w", "steps"}  # the script never sees the controls
        assert helper.active
        w = torch.nn.Parameter(model.params["w"].clone())
        for _ in range(2):  # two steps of plain SGD at lr 0.25 on the loss sum(w): grad 1, corrected by c - 0
            w.grad = torch.ones(2)
            helper.correct([("w", w)], lr=0.25)
            torch.testing.assert_close(w.grad, torch.tensor([1.5, 0.5]))
            with torch.no_grad():
                w -= 0.25 * w.grad
        y = w.detach()
        torch.testing.assert_close(y, torch.tensor([0.25, 1.75]))
        result = await send_answered(site, session, FLModel(params={"w": y, "steps": model.params["steps"]}))
        assert not helper.active
        back = serde.read_file(result.path)
        assert result.params_type == "DIFF" and set(back) == {"w", "steps", "scaffold.c.w"}
        torch.testing.assert_close(back["w"], torch.tensor([-0.75, -0.25]))  # y - x
        # c_i+ = 0 - c + (x - y)/(K lr) = -(0.5, -0.5) + (0.75, 0.25)/0.5 = (1.0, 1.0); delta = c_i+ - 0
        torch.testing.assert_close(back["scaffold.c.w"], torch.tensor([1.0, 1.0]))

        # round 2: the site's c_i is the one kept; a script that sends no step at all is told how to fix it
        await site.push_task("t2", _scaffold_model(0.0), params_type="DIFF", options={"scaffold": True})
        model = await asyncio.to_thread(session.receive)
        w = torch.nn.Parameter(model.params["w"].clone())
        w.grad = torch.zeros(2)
        helper.correct([("w", w)], lr=0.5)
        torch.testing.assert_close(w.grad, torch.tensor([-1.0, -1.0]))  # c - c_i = 0 - 1
        result = await send_answered(site, session, FLModel(params={"w": model.params["w"] + 0.5}))
        back = serde.read_file(result.path)
        # c_i+ = (1, 1) - 0 + (-0.5)/(1 * 0.5) = (0, 0); delta = -(1, 1)
        torch.testing.assert_close(back["scaffold.c.w"], torch.tensor([-1.0, -1.0]))

        await site.push_task("t3", _scaffold_model(0.0), options={"scaffold": True})
        model = await asyncio.to_thread(session.receive)
        with pytest.raises(ConfigError, match="ScaffoldHelper"):
            session.send(FLModel(params=model.params))

        # an evaluation sees no controls, and opens no SCAFFOLD round
        session._current = None
        await site.push_task("e1", _scaffold_model(0.5), kind="evaluate", options={"scaffold": True})
        model = await asyncio.to_thread(session.receive)
        assert set(model.params) == {"w", "steps"} and not helper.active
    finally:
        session.close()


async def test_a_scaffold_task_without_controls_is_refused(site: FakeSite) -> None:
    session = await connected(site)
    try:
        await site.push_task("t1", sample_params(), options={"scaffold": True})
        with pytest.raises(JobError, match="no control variates"):
            await asyncio.to_thread(session.receive)
    finally:
        session.close()


async def test_module_level_is_submit_model_and_get_config(site: FakeSite) -> None:
    session = await connected(site)

    def script() -> tuple[bool, bool, str]:
        from fedbus.client.api import bind_thread

        bind_thread(session)
        try:
            assert flare.is_running()
            return flare.is_submit_model(), flare.is_train(), flare.get_config()["TASK_EXCHANGE"]["exchange_format"]
        finally:
            bind_thread(None)

    try:
        await site.push_task("s1", None, kind="submit_model", options={"exchange": "numpy"})
        assert await asyncio.to_thread(script) == (True, False, "numpy")
    finally:
        session.close()
