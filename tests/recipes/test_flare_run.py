"""FLARE-style jobs run in SimEnv as FLARE users write them: the seed's pattern, the Run methods, site names,
and scripts in a process of their own."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fedbus.errors import ConfigError
from fedbus.modelio import serde
from fedbus.recipes import FedAvgRecipe, PocEnv, SimEnv
from fedbus.recipes._driver import keep_download
from fedbus.recipes.run import Run

from .helpers import seed_job


@pytest.mark.timeout(60)
def test_the_seed_pattern_runs_as_written(tmp_path: Path) -> None:
    script = seed_job(tmp_path / "src")
    n, b = 2, 16
    recipe = FedAvgRecipe(
        name="seed",
        min_clients=n,
        num_rounds=2,
        model={"class_path": "net.TinyNet", "args": {}},
        train_script=str(script),
        train_args=f"--batch_size {b} --epochs 1",
    )
    env = SimEnv(num_clients=n, num_threads=n, workspace_root=tmp_path / "ws")
    run = recipe.execute(env=env)

    assert run.get_status() == "finished", run.reason
    assert run.get_job_id() == run.job_id and run.job_id.startswith("seed-")
    assert [h["version"] for h in run.history] == [0, 1, 2]
    assert run.metrics["batch_size"] == b  # the string's arguments reached argparse in every site's script
    assert run.metrics["loss"] < run.history[1]["metrics"]["loss"]  # and it trained
    result = Path(run.get_result())
    assert result == tmp_path / "ws" / "broker" / "jobs" / run.job_id
    assert (result / "models").is_dir() and run.checkpoints[-1][2].parent == result / "models"

    text = repr(run)
    assert text.startswith("Run(") and "seed" in text and "finished" in text and "version=2" in text
    assert "tensor(" not in text and "model_path=" in text and len(text) < 400
    assert run.model is not None and set(run.model) == {"fc.weight", "fc.bias"}


@pytest.mark.timeout(60)
def test_site_names_and_scripts_in_threads_or_processes(tmp_path: Path) -> None:
    script = seed_job(tmp_path / "src")

    def pids(external: bool) -> dict[str, float]:
        recipe = FedAvgRecipe(
            name="ext" if external else "thr",
            min_clients=2,
            num_rounds=1,
            model={"class_path": "net.TinyNet"},
            train_script=script,
            train_args=["--batch_size", "32", "--epochs", "1"],
            launch_external_process=external,
            evaluate_every=1,
        )
        env = SimEnv(clients=["alice", "bob"], num_threads=2, workspace=tmp_path / f"ws-{external}", progress=False)
        run = recipe.execute(env)
        assert run.status == "finished", run.reason
        (evaluation,) = run.evaluations
        return {site: m["pid"] for site, m in evaluation.sites.items()}

    threads = pids(external=False)
    assert sorted(threads) == ["alice", "bob"] and set(threads.values()) == {float(os.getpid())}
    processes = pids(external=True)
    assert sorted(processes) == ["alice", "bob"]
    assert float(os.getpid()) not in processes.values() and len(set(processes.values())) == 2


def test_run_model_leaves_scaffold_controls_out(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    serde.write_file(path, serde.layout({"w": torch.ones(2), "scaffold.c.w": torch.zeros(2)}))
    run = Run(job_id="j-1", workspace=tmp_path, name="j")
    download = {"history": [{"version": 0, "time": 1.0, "metrics": {}}], "model_path": str(path), "version": 0}
    download["cross_site"] = {"server": {"site-1": {"accuracy": 0.5}}}
    run.fill(download, job={"state": "finished"}, checkpoint_dir=None, result_dir=tmp_path)
    assert set(run.model or {}) == {"w"}
    assert run.cross_site == {"server": {"site-1": {"accuracy": 0.5}}}
    assert run.get_result() == str(tmp_path) and run.best_model_path is None
    assert "tensor(" not in repr(run) and "finished" in repr(run)

    serde.write_file(tmp_path / "best_model.safetensors", serde.layout({"w": torch.ones(2)}))
    run.fill(download, job={"state": "finished"}, checkpoint_dir=None, result_dir=tmp_path)
    assert run.best_model_path == tmp_path / "best_model.safetensors"
    run.fill({**download, "best_model_path": str(path)}, job={"state": "finished"}, checkpoint_dir=None)
    assert run.best_model_path == path and run.get_result() is None


def test_a_download_kept_as_the_result_folder_holds_history_and_the_cross_site_matrix(tmp_path: Path) -> None:
    matrix = {"server": {"site-1": {"accuracy": 0.5}}}
    keep_download({"history": [{"version": 0, "time": 1.0, "metrics": {}}], "cross_site": matrix}, tmp_path)
    assert json.loads((tmp_path / "history.json").read_text())[0]["version"] == 0
    assert json.loads((tmp_path / "cross_site_val" / "cross_val_results.json").read_text()) == matrix


@pytest.mark.timeout(120)
def test_the_same_flare_style_job_runs_in_poc_env_with_named_sites(tmp_path: Path) -> None:
    recipe = FedAvgRecipe(
        name="poc-seed",
        min_clients=2,
        num_rounds=1,
        model={"class_path": "net.TinyNet"},
        train_script=seed_job(tmp_path / "src"),
        train_args="--batch_size 32 --epochs 1",
        evaluate_every=1,
    )
    run = recipe.execute(PocEnv(clients=["alice", "bob"], workspace=tmp_path / "ws", progress=False))
    assert run.get_status() == "finished", run.reason
    assert sorted(run.evaluations[-1].sites) == ["alice", "bob"]
    assert Path(run.get_result()) == (tmp_path / "ws" / "broker" / "jobs" / run.job_id).resolve()
    assert all(pid != os.getpid() for pid in (m["pid"] for m in run.evaluations[-1].sites.values()))
    with pytest.raises(ConfigError, match="broker"):
        PocEnv(clients=["broker"])


NUMPY_SCRIPT = """
import numpy as np

import fedbus.client as flare
from fedbus.client import NPConstants

flare.init()
while flare.is_running():
    model = flare.receive()
    weights = model.params[NPConstants.NUMPY_KEY]
    if type(weights) is not np.ndarray or weights.dtype != np.float32:
        raise TypeError(f"the script must see a float32 numpy array, got {type(weights)} {weights.dtype}")
    flare.send(flare.FLModel(params={NPConstants.NUMPY_KEY: weights * 2 + 1}, metrics={"mean": float(weights.mean())}))
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("external", [False, True])
def test_numpy_recipes_are_numpy_end_to_end(tmp_path: Path, external: bool) -> None:
    from fedbus.recipes import NumpyFedAvgRecipe

    script = tmp_path / "src" / "np_client.py"
    script.parent.mkdir(parents=True)
    script.write_text(NUMPY_SCRIPT)
    recipe = NumpyFedAvgRecipe(
        name="np",
        min_clients=2,
        num_rounds=2,
        model=[[1, 2], [3, 4]],
        train_script=str(script),
        launch_external_process=external,
    )
    run = recipe.execute(SimEnv(num_clients=2, workspace_root=tmp_path / "ws"))
    assert run.get_status() == "finished", run.reason
    final = run.model["numpy_key"]
    assert final.dtype == torch.float32  # kept float32 end to end (numpy's float64 promotion cast back)
    expected = torch.tensor([[1.0, 2.0], [3.0, 4.0]]) * 4 + 3  # (x*2+1)*2+1
    assert torch.equal(final, expected)
