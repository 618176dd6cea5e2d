"""Recipes without running anything: the exported folder is the job format, and bad arguments fail at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import fedbus.recipes
from fedbus import jobs
from fedbus.errors import ConfigError
from fedbus.modelio import serde
from fedbus.recipes import FedAvgRecipe, FedBuffRecipe, SpeedProfile

from .helpers import tiny_model, tiny_script


def test_public_api_is_pinned() -> None:
    assert fedbus.recipes.__all__ == [
        "CyclicRecipe",
        "DataKind",
        "Evaluation",
        "ExchangeFormat",
        "FedAvgLrRecipe",
        "FedAvgRecipe",
        "FedBuffRecipe",
        "FedEvalRecipe",
        "FedOptRecipe",
        "FedProxRecipe",
        "NPConstants",
        "NumpyCrossSiteEvalRecipe",
        "NumpyFedAvgRecipe",
        "PocEnv",
        "ProdEnv",
        "Progress",
        "Recipe",
        "Run",
        "ScaffoldRecipe",
        "SimEnv",
        "SpeedProfile",
        "TransferType",
        "add_cross_site_evaluation",
        "add_experiment_tracking",
    ]


def test_export_writes_the_job_folder_fedbus_submit_takes(tmp_path: Path) -> None:
    script = tiny_script(tmp_path / "src")
    (tmp_path / "src" / "helper.py").write_text("X = 1\n")
    (tmp_path / "src" / "pkg").mkdir()
    (tmp_path / "src" / "pkg" / "__init__.py").write_text("")
    recipe = FedAvgRecipe(
        "tiny",
        tiny_model(),
        script,
        ["--epochs", 2],
        min_clients=2,
        num_rounds=3,
        time_budget=60,
        evaluate_every=1,
        files=[tmp_path / "src" / "helper.py", tmp_path / "src" / "pkg"],
    )
    folder = recipe.export(tmp_path / "job")
    spec = jobs.load_job_folder(folder)
    assert spec == recipe.job_spec()
    assert spec.strategy == "fedavg" and spec.script == "tiny.py" and spec.script_args == ("--epochs", "2")
    assert spec.strategy_args == {"min_clients": 2, "num_rounds": 3, "time_budget": 60, "evaluate_every": 1}
    assert spec.min_sites == 2
    assert (folder / "helper.py").is_file() and (folder / "pkg" / "__init__.py").is_file()
    assert torch.equal(serde.read_file(folder / "model.safetensors")["w"], torch.zeros(4))
    assert jobs.pack_job(folder)  # what `fedbus submit` sends
    with pytest.raises(ConfigError, match="new or empty"):
        recipe.export(folder)


def test_model_may_be_a_module_a_state_dict_or_a_file(tmp_path: Path) -> None:
    script = tiny_script(tmp_path)
    net = nn.Linear(3, 2)
    a = FedAvgRecipe("a", net, script)
    assert set(a.model) == {"weight", "bias"} and torch.equal(a.model["weight"], net.weight.detach())
    with torch.no_grad():
        net.weight.add_(1.0)  # a recipe is a value: later training does not change it
    assert not torch.equal(a.model["weight"], net.weight.detach())
    serde.write_file(tmp_path / "m.safetensors", serde.layout({"w": torch.ones(2)}))
    b = FedAvgRecipe("b", tmp_path / "m.safetensors", script)
    assert torch.equal(b.model["w"], torch.ones(2))
    for bad in (tmp_path / "missing.safetensors", 42, {}, {"w": [1, 2]}):
        with pytest.raises(ConfigError, match="model"):
            FedAvgRecipe("c", bad, script)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_rounds": 0}, "num_rounds"),
        ({"min_clients": 3, "max_clients": 2}, "max_clients"),
        ({"round_timeout": -1}, "round_timeout"),
        ({"time_budget": 0}, "time_budget"),
        ({"train_args": "--epochs 'unclosed"}, "train_args"),
        ({"train_args": [None]}, "train_args"),
        ({"files": ["/nonexistent/net.py"]}, "does not exist"),
    ],
)
def test_fedavg_arguments_are_checked_when_the_recipe_is_built(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FedAvgRecipe("x", tiny_model(), tiny_script(tmp_path), **kwargs)


def test_fedbuff_arguments_are_checked_and_survive_the_toml(tmp_path: Path) -> None:
    script = tiny_script(tmp_path)
    with pytest.raises(ConfigError, match="stop condition"):
        FedBuffRecipe("x", tiny_model(), script)
    with pytest.raises(ConfigError, match="staleness"):
        FedBuffRecipe("x", tiny_model(), script, num_versions=2, staleness="nope")
    with pytest.raises(ConfigError, match="server_lr"):
        FedBuffRecipe("x", tiny_model(), script, num_versions=2, server_lr=0)
    recipe = FedBuffRecipe(
        "buff",
        tiny_model(),
        script,
        concurrency=3,
        buffer_size=2,
        num_versions=5,
        staleness="hinge",
        staleness_kwargs={"a": 1.0, "b": 2.0},
        server_momentum=0.5,
        min_clients=2,
    )
    spec = jobs.load_job_folder(recipe.export(tmp_path / "job"))
    assert spec.strategy == "fedbuff" and spec.min_sites == 2 and recipe.total == 5
    assert spec.strategy_args["staleness_kwargs"] == {"a": 1.0, "b": 2.0}
    assert spec.strategy_args["server_momentum"] == 0.5


def test_names_and_files_must_not_clash(tmp_path: Path) -> None:
    script = tiny_script(tmp_path)
    with pytest.raises(ConfigError, match="name"):
        FedAvgRecipe("bad name!", tiny_model(), script)
    with pytest.raises(ConfigError, match="tiny.py"):
        FedAvgRecipe("x", tiny_model(), script, files=[script])
    (tmp_path / "job.toml").write_text("")
    with pytest.raises(ConfigError, match="job.toml"):
        FedAvgRecipe("x", tiny_model(), script, files=[tmp_path / "job.toml"])
    with pytest.raises(ConfigError, match="train_script"):
        FedAvgRecipe("x", tiny_model(), tmp_path / "nope.py")


def test_speed_profiles_are_seeded_and_prefix_stable() -> None:
    assert SpeedProfile.fixed([1, 2, 4]).factors(2) == [1.0, 2.0]
    with pytest.raises(ConfigError):
        SpeedProfile.fixed([1, 0])
    with pytest.raises(ConfigError, match="2 factors for 3"):
        SpeedProfile.fixed([1, 2]).factors(3)
    ln = SpeedProfile.lognormal(sigma=0.5, seed=7)
    assert ln.factors(5) == SpeedProfile.lognormal(sigma=0.5, seed=7).factors(5)
    assert ln.factors(5)[:3] == ln.factors(3)
    assert ln.factors(3) != SpeedProfile.lognormal(sigma=0.5, seed=8).factors(3)
    ex = SpeedProfile.exponential(mean=2.0, seed=1).factors(4)
    assert all(f >= 0 for f in ex) and ex == SpeedProfile.exponential(mean=2.0, seed=1).factors(4)
