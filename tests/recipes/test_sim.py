"""SimEnv: the real broker and sites in this process, each site's script in a thread."""

from __future__ import annotations

import itertools
import sys
import threading
from pathlib import Path

import pytest
import torch

from fedbus.recipes import FedAvgRecipe, FedBuffRecipe, Progress, SimEnv, SpeedProfile

from .helpers import tiny_model, tiny_script


def script_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fedbus-site-")]


@pytest.mark.timeout(60)
def test_federated_evaluation_reports_every_site_and_no_params_leave_a_site(tmp_path: Path) -> None:
    argv, path = list(sys.argv), list(sys.path)
    recipe = FedAvgRecipe(
        "tiny", tiny_model(), tiny_script(tmp_path / "src"), min_clients=3, num_rounds=2, evaluate_every=2
    )
    run = recipe.execute(SimEnv(3, workspace=tmp_path / "ws", progress=False))
    assert run.status == "finished", run.reason
    assert [h["version"] for h in run.history] == [0, 1, 2]
    assert run.model is not None and torch.equal(run.model["w"], torch.full((4,), 2.0))
    assert [(v, p.name) for v, _, p in run.checkpoints] == [(i, f"v{i}.safetensors") for i in range(3)]

    (final,) = run.evaluations  # evaluated after the last round
    assert final.version == 2 and sorted(final.sites) == ["site-1", "site-2", "site-3"]
    assert all(m["score"] == 8.0 for m in final.sites.values())
    assert final.mean["score"] == 8.0

    evals = [t for t in run.tasks if t["kind"] == "evaluate"]
    trains = [t for t in run.tasks if t["kind"] == "train"]
    assert len(evals) == 3 and len(trains) == 6
    assert all(t["params_bytes"] == 0 for t in evals)  # the script set params: the site kept them
    assert all(t["params_bytes"] > 0 for t in trains)
    assert {u["task_id"] for u in run.updates} == {t["task_id"] for t in trains}  # no upload for evaluations
    assert "wall_s" in run.timing and run.timing["busy_s"] > 0

    assert not script_threads() and sys.argv == argv and sys.path == path  # ending the job ended its threads


@pytest.mark.timeout(60)
def test_slow_sites_hold_results_back_and_one_training_slot_serializes(tmp_path: Path) -> None:
    recipe = FedAvgRecipe(
        "slow", tiny_model(), tiny_script(tmp_path / "src"), ["slow"], min_clients=3, num_rounds=2, evaluate_every=2
    )
    env = SimEnv(3, num_threads=1, workspace=tmp_path / "ws", speed=SpeedProfile.fixed([1.0, 1.0, 2.5]), progress=False)
    run = recipe.execute(env)
    assert run.status == "finished", run.reason
    trains = [t for t in run.tasks if t["kind"] == "train"]
    for t in trains:
        expected = 1.5 * t["train_s"] if t["site"] == "site-3" else 0.0
        assert t["sim_delay_s"] == pytest.approx(expected, abs=1e-3)
        assert t["train_s"] >= 0.2
    speeds = {site: m["speed"] for site, m in run.evaluations[-1].sites.items()}
    assert speeds == {"site-1": 1.0, "site-2": 1.0, "site-3": 2.5}  # system_info()["speed_factor"]
    spans = sorted((t["received_at"] - t["train_s"], t["received_at"]) for t in run.tasks)
    assert all(a[1] <= b[0] + 0.01 for a, b in itertools.pairwise(spans))  # one slot: never two at once


@pytest.mark.timeout(60)
def test_a_script_thread_that_raises_is_a_crashed_site(tmp_path: Path) -> None:
    recipe = FedAvgRecipe("crash", tiny_model(), tiny_script(tmp_path / "src"), ["crash"], min_clients=2, num_rounds=2)
    run = recipe.execute(SimEnv(2, workspace=tmp_path / "ws", progress=False))
    assert run.status == "failed" and "round 1" in run.reason
    logs = list((tmp_path / "ws").glob("site-*/jobs/*/script.log"))
    assert logs and "RuntimeError: boom at site-" in logs[0].read_text()
    assert not script_threads()


@pytest.mark.timeout(60)
def test_wait_false_returns_a_handle_that_can_abort(tmp_path: Path) -> None:
    recipe = FedAvgRecipe("long", tiny_model(), tiny_script(tmp_path / "src"), min_clients=2, num_rounds=100_000)
    run = recipe.execute(SimEnv(2, workspace=tmp_path / "ws", progress=False), wait=False)
    assert run.status == "running" and run.job_id.startswith("long-")
    with pytest.raises(TimeoutError):
        run.wait(timeout=0.3)
    run.abort()
    run.wait(timeout=30)
    assert run.status == "aborted" and run.version is not None and run.model is not None
    assert not script_threads()


@pytest.mark.timeout(60)
def test_fedbuff_recipe_runs_asynchronously(tmp_path: Path) -> None:
    recipe = FedBuffRecipe(
        "buff",
        tiny_model(),
        tiny_script(tmp_path / "src"),
        concurrency=3,
        buffer_size=2,
        num_versions=3,
        evaluate_every=3,
    )
    run = recipe.execute(SimEnv(3, workspace=tmp_path / "ws", progress=False))
    assert run.status == "finished", run.reason
    assert run.history[-1]["version"] == 3
    accepted = [u for u in run.updates if u["accepted"]]
    assert len(accepted) >= 6 and all(u["staleness"] is not None for u in accepted)
    assert len(run.evaluations[-1].sites) == 3


@pytest.mark.timeout(60)
def test_keyboard_interrupt_in_a_progress_callback_stops_everything(tmp_path: Path) -> None:
    argv = list(sys.argv)
    recipe = FedAvgRecipe("long", tiny_model(), tiny_script(tmp_path / "src"), min_clients=2, num_rounds=100_000)

    def progress(p: Progress) -> None:
        if p.version >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recipe.execute(SimEnv(2, workspace=tmp_path / "ws", progress=progress))
    assert not script_threads() and sys.argv == argv
    assert not [t for t in threading.enumerate() if t.name.startswith("fedbus-long")]  # the loop thread too


RICH_SCRIPT = """
import time

from rich.progress import Progress
from shared import both  # one module for both script threads: their progress bars overlap

import fedbus.client as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    with Progress() as bar:  # rich's live display, as Lightning's RichProgressBar uses it
        task = bar.add_task("train", total=3)
        both.wait()
        for _ in range(3):
            time.sleep(0.01)
            bar.advance(task)
        both.wait()
    flare.send(flare.FLModel(params={k: v + 1 for k, v in model.params.items()}, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""


@pytest.mark.timeout(60)
def test_two_scripts_show_rich_progress_bars_at_once(tmp_path: Path) -> None:
    pytest.importorskip("rich")
    import rich

    before = rich._console
    script = tmp_path / "src" / "bars.py"
    script.parent.mkdir(parents=True)
    script.write_text(RICH_SCRIPT)
    shared = script.parent / "shared.py"
    shared.write_text("import threading\n\nboth = threading.Barrier(2, timeout=10)\n")
    recipe = FedAvgRecipe("bars", tiny_model(), script, min_clients=2, num_rounds=2, files=[shared])
    run = recipe.execute(SimEnv(2, num_threads=2, workspace=tmp_path / "ws", progress=False))
    assert run.status == "finished", run.reason  # one shared console's live stack crashed one of the two
    assert torch.equal(run.model["w"], torch.full((4,), 2.0))
    assert rich._console is before  # the simulator put rich's own console back
