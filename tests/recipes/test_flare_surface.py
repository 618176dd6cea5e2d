"""FLARE's recipe surface, without running a job: argument forms, model forms, what lands in job.toml."""

from __future__ import annotations

import importlib
import json
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch

from fedbus import jobs
from fedbus.errors import ConfigError
from fedbus.modelio import serde
from fedbus.recipes import (
    CyclicRecipe,
    DataKind,
    FedAvgLrRecipe,
    FedAvgRecipe,
    FedEvalRecipe,
    FedOptRecipe,
    FedProxRecipe,
    NPConstants,
    NumpyCrossSiteEvalRecipe,
    NumpyFedAvgRecipe,
    ProdEnv,
    ScaffoldRecipe,
    SimEnv,
    TransferType,
    add_cross_site_evaluation,
    add_experiment_tracking,
)
from fedbus.recipes._models import script_imports
from fedbus.recipes.algorithms import optimizer_from_args

from .helpers import seed_job, tiny_model, tiny_script


def tiny_net(folder: Path, **kwargs: int) -> torch.nn.Module:
    """A TinyNet from the job folder's own net.py, imported as a job.py next to it would."""
    with script_imports(folder):
        return importlib.import_module("net").TinyNet(**kwargs)


def test_train_args_as_one_string_is_split_as_a_shell_would(tmp_path: Path) -> None:
    script = tiny_script(tmp_path)
    r = FedAvgRecipe(name="x", model=tiny_model(), train_script=script, train_args="--batch_size 4 --note 'a b'")
    assert r.train_args == ("--batch_size", "4", "--note", "a b")
    assert FedAvgRecipe("x", tiny_model(), script, ["--epochs", 2, 0.5]).train_args == ("--epochs", "2", "0.5")
    assert jobs.load_job_folder(r.export(tmp_path / "job")).script_args == ("--batch_size", "4", "--note", "a b")


def test_flare_defaults_and_keyword_form(tmp_path: Path) -> None:
    script = tiny_script(tmp_path)
    r = FedAvgRecipe(min_clients=2, model=tiny_model(), train_script=script)
    assert r.name == "fedavg" and r.strategy_args["num_rounds"] == 2 and r.min_sites == 2
    assert r.tracking == {"key_metric": "accuracy"}
    with pytest.raises(ConfigError, match="train_script is required"):
        FedAvgRecipe(min_clients=2, model=tiny_model())
    with pytest.raises(ConfigError, match="model"):
        FedAvgRecipe(min_clients=2, train_script=script)


def test_model_as_class_path_is_built_from_the_script_folder_and_ships_its_module(tmp_path: Path) -> None:
    script = seed_job(tmp_path / "src")
    r = FedAvgRecipe(
        name="cp",
        model={"class_path": "net.TinyNet", "args": {"hidden": 5}},
        train_script=script,
        train_args="--batch_size 8 --epochs 1",
    )
    assert {k: tuple(v.shape) for k, v in r.model.items()} == {
        "fc.0.weight": (5, 3),
        "fc.0.bias": (5,),
        "fc.1.weight": (1, 5),
        "fc.1.bias": (1,),
    }
    folder = r.export(tmp_path / "job")
    assert (folder / "net.py").is_file()  # the script imports it: it travels as FLARE ships a model's module
    for bad, match in [
        ({"class_path": "net.Nope"}, "cannot import"),
        ({"class_path": "nomodule_here.X"}, "cannot import"),
        ({"class_path": "net.TinyNet", "args": {"width": 1}}, "failed"),
        ({"class_path": "net.TinyNet", "argz": {}}, "unknown key"),
    ]:
        with pytest.raises(ConfigError, match=match):
            FedAvgRecipe(name="cp", model=bad, train_script=script)


def test_an_nn_module_from_the_script_folder_ships_its_module(tmp_path: Path) -> None:
    script = seed_job(tmp_path / "src")
    r = FedAvgRecipe(name="mod", model=tiny_net(tmp_path / "src"), train_script=script)
    assert [f.name for f in r.files] == ["net.py"]
    # given explicitly, it is not added twice
    assert len(FedAvgRecipe("m", tiny_net(tmp_path / "src"), script, files=[tmp_path / "src" / "net.py"]).files) == 1


def test_pt_checkpoints_and_initial_ckpt(tmp_path: Path) -> None:
    script = seed_job(tmp_path / "src")
    net = tiny_net(tmp_path / "src")
    trained = {k: torch.full_like(v, 3.0) for k, v in net.state_dict().items()}
    torch.save(trained, tmp_path / "plain.pt")
    torch.save({"model": trained, "epoch": 4}, tmp_path / "wrapped.pt")
    serde.write_file(tmp_path / "w.safetensors", serde.layout(trained))

    for path in ("plain.pt", "wrapped.pt", "w.safetensors"):
        r = FedAvgRecipe(name="ck", model=tmp_path / path, train_script=script)
        assert all(torch.equal(v, trained[k]) for k, v in r.model.items()), path
        r = FedAvgRecipe(name="ck", model=net, initial_ckpt=str(tmp_path / path), train_script=script)
        assert all(torch.equal(v, trained[k]) for k, v in r.model.items()), path
    only_ckpt = FedAvgRecipe(name="ck", initial_ckpt=tmp_path / "plain.pt", train_script=script)
    assert set(only_ckpt.model) == set(trained)

    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pt")
    with pytest.raises(ConfigError, match="initial_ckpt"):
        FedAvgRecipe(name="ck", model=net, initial_ckpt=tmp_path / "wrong.pt", train_script=script)
    torch.save({"fc.weight": torch.zeros(5, 5), "fc.bias": torch.zeros(1)}, tmp_path / "shape.pt")
    with pytest.raises(ConfigError, match=r"initial_ckpt: fc.weight has shape"):
        FedAvgRecipe(name="ck", model=net, initial_ckpt=tmp_path / "shape.pt", train_script=script)
    torch.save({"w": torch.zeros(1), "obj": PurePosixPath("x")}, tmp_path / "pickled.pt")  # not weights: refused
    with pytest.raises(ConfigError, match="cannot read"):
        FedAvgRecipe(name="ck", model=tmp_path / "pickled.pt", train_script=script)
    with pytest.raises(ConfigError, match="initial_ckpt"):
        FedAvgRecipe(name="ck", model=net, initial_ckpt=tmp_path / "missing.pt", train_script=script)


def test_client_and_tracking_options_land_in_job_toml(tmp_path: Path) -> None:
    script = tiny_script(tmp_path)
    (tmp_path / "extra.txt").write_text("data")
    r = FedAvgRecipe(
        name="opts",
        model=tiny_model(),
        train_script=script,
        min_clients=2,
        launch_external_process=True,
        client_memory_gc_rounds=2,
        aggregator_data_kind=DataKind.WEIGHT_DIFF,
        key_metric="val_acc",
    )
    r.add_client_file(str(tmp_path / "extra.txt"))
    r.enable_log_streaming()
    add_experiment_tracking(r, tracking_type="tensorboard")
    add_experiment_tracking(r, "mlflow")
    add_cross_site_evaluation(r)
    spec = jobs.load_job_folder(r.export(tmp_path / "job"))
    assert spec.client == {
        "transfer_type": "DIFF",
        "memory_gc_rounds": 2,
        "external_process": True,
        "log_streaming": True,
    }
    assert spec.tracking == {"key_metric": "val_acc", "types": ["tensorboard", "mlflow"]}
    assert spec.cross_site_eval is True
    assert (tmp_path / "job" / "extra.txt").read_text() == "data"

    plain = FedAvgRecipe(name="plain", model=tiny_model(), train_script=script)
    assert plain.job_spec().client == {} and not plain.job_spec().cross_site_eval
    diff = FedAvgRecipe(name="d", model=tiny_model(), train_script=script, params_transfer_type=TransferType.DIFF)
    assert diff.client == {"transfer_type": "DIFF"}
    with pytest.raises(ConfigError, match="already"):
        add_cross_site_evaluation(r)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"aggregator_data_kind": DataKind.METRICS}, "aggregator_data_kind"),
        ({"aggregator_data_kind": "BOGUS"}, "aggregator_data_kind"),
        ({"params_transfer_type": "half"}, "params_transfer_type"),
        ({"launch_external_process": "yes"}, "launch_external_process"),
        ({"client_memory_gc_rounds": -1}, "client_memory_gc_rounds"),
        ({"key_metric": ""}, "key_metric"),
    ],
)
def test_bad_flare_options_name_the_argument(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FedAvgRecipe(name="x", model=tiny_model(), train_script=tiny_script(tmp_path), **kwargs)


def test_bad_helpers_and_files_name_the_culprit(tmp_path: Path) -> None:
    r = FedAvgRecipe(name="x", model=tiny_model(), train_script=tiny_script(tmp_path))
    with pytest.raises(ConfigError, match="tracking_type"):
        add_experiment_tracking(r, tracking_type="neptune")
    with pytest.raises(ConfigError, match="add_client_file"):
        r.add_client_file(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="add_client_file"):
        r.add_client_file(tmp_path / "tiny.py")  # the script's own name
    with pytest.raises(ConfigError, match="clients"):
        r.add_client_file(tmp_path / "tiny.py", clients=["site-1"])
    with pytest.raises(ConfigError, match="recipe"):
        add_cross_site_evaluation("not a recipe")  # type: ignore[arg-type]


def test_export_to_job_dir_round_trips_and_replaces_an_earlier_export(tmp_path: Path) -> None:
    r = FedAvgRecipe(name="hello", model=tiny_model(), train_script=tiny_script(tmp_path), train_args="--epochs 1")
    folder = r.export(job_dir=tmp_path / "jobs")
    assert folder == tmp_path / "jobs" / "hello"
    spec = jobs.load_job_folder(folder)
    assert spec == r.job_spec()
    assert torch.equal(serde.read_file(folder / "model.safetensors")["w"], r.model["w"])
    (folder / "stale.txt").write_text("from an earlier export")
    assert r.export(job_dir=tmp_path / "jobs") == folder and not (folder / "stale.txt").exists()
    assert jobs.load_job_folder(r.export(tmp_path / "positional")) == spec
    with pytest.raises(ConfigError, match="exactly one"):
        r.export()
    with pytest.raises(ConfigError, match="exactly one"):
        r.export(tmp_path / "a", job_dir=tmp_path / "b")


def test_numpy_recipes_ask_for_numpy_exchange(tmp_path: Path) -> None:
    script = tiny_script(tmp_path)
    r = NumpyFedAvgRecipe(
        name="hello-numpy",
        min_clients=2,
        num_rounds=3,
        model=[[1, 2, 3], [4, 5, 6], [7, 8, 9]],
        train_script=script,
        train_args="--update_type diff",
        params_transfer_type=TransferType.DIFF,
    )
    spec = jobs.load_job_folder(r.export(tmp_path / "job"))
    assert spec.client == {"exchange": "numpy", "transfer_type": "DIFF"}
    model = serde.read_file(tmp_path / "job" / "model.safetensors")
    assert list(model) == [NPConstants.NUMPY_KEY] and model[NPConstants.NUMPY_KEY].dtype == torch.float32
    assert model[NPConstants.NUMPY_KEY].tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]

    np.save(tmp_path / "start.npy", np.arange(4.0))
    from_file = NumpyFedAvgRecipe(min_clients=1, initial_ckpt=str(tmp_path / "start.npy"), train_script=script)
    assert from_file.model[NPConstants.NUMPY_KEY].tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ConfigError, match="initial_ckpt"):
        NumpyFedAvgRecipe(min_clients=1, initial_ckpt=tmp_path / "start.pt", train_script=script)
    with pytest.raises(ConfigError, match="model"):
        NumpyFedAvgRecipe(min_clients=1, model=[["a"]], train_script=script)


def test_numpy_cross_site_eval_ships_every_server_model(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    np.save(models / "server_1.npy", np.ones(3))
    np.save(models / "server_2.npy", np.full(3, 2.0))
    r = NumpyCrossSiteEvalRecipe(
        name="hello-numpy-cse",
        min_clients=2,
        model_dir=str(models),
        model_name={"server_model_1": "server_1.npy", "server_model_2": "server_2.npy"},
    )
    folder = r.export(tmp_path / "job")
    spec = jobs.load_job_folder(folder)
    assert spec.strategy == "cross_site_eval" and spec.client == {"exchange": "numpy"}
    assert spec.strategy_args == {"evaluate_global": False, "submit_models": False}  # no "server": all by name
    assert spec.script == "_np_validator.py"  # no eval_script: the built-in evaluator, with no model of its own
    assert serde.read_file(folder / "model.safetensors")["numpy_key"].tolist() == [1.0, 1.0, 1.0]
    for n, value in (("server_model_1", 1.0), ("server_model_2", 2.0)):
        assert serde.read_file(folder / "cross_site_models" / f"{n}.safetensors")["numpy_key"].tolist() == [value] * 3

    np.save(tmp_path / "one.npy", np.arange(3.0))
    own = NumpyCrossSiteEvalRecipe(initial_ckpt=str(tmp_path / "one.npy"), eval_script=tiny_script(tmp_path / "s"))
    assert own.strategy_args == {"evaluate_global": True, "submit_models": True} and not own.extra_models
    with pytest.raises(ConfigError, match="model_name"):
        NumpyCrossSiteEvalRecipe(model_dir=str(models), model_name={"m": "missing.npy"})


def test_fedavg_lr_recipe_starts_from_zeros_of_num_features_plus_one(tmp_path: Path) -> None:
    script = tiny_script(tmp_path)
    r = FedAvgLrRecipe(min_clients=2, num_rounds=5, damping_factor=0.8, num_features=13, train_script=script)
    assert r.name == "lr_fedavg" and r.client == {"exchange": "numpy"}
    assert r.model["numpy_key"].shape == (14, 1) and not r.model["numpy_key"].any()
    assert r.strategy_args == {"min_clients": 2, "num_rounds": 5, "damping_factor": 0.8, "num_features": 13}
    np.save(tmp_path / "lr.npy", np.ones((3, 1)))
    with pytest.raises(ConfigError, match="initial_ckpt"):
        FedAvgLrRecipe(min_clients=2, num_features=13, initial_ckpt=tmp_path / "lr.npy", train_script=script)


def test_training_recipes_map_to_their_strategies(tmp_path: Path) -> None:
    script = seed_job(tmp_path / "src")
    model = tiny_net(tmp_path / "src")
    prox = FedProxRecipe(name="p", min_clients=2, num_rounds=2, model=model, train_script=script, fedprox_mu=0.1)
    assert prox.strategy == "fedprox" and prox.strategy_args["fedprox_mu"] == 0.1
    scaffold = ScaffoldRecipe(min_clients=2, num_rounds=3, model=model, train_script=script)
    assert scaffold.name == "scaffold" and scaffold.strategy == "scaffold"
    cyclic = CyclicRecipe(min_clients=2, num_rounds=2, model=model, train_script=script)
    assert cyclic.name == "cyclic" and cyclic.strategy_args == {"num_rounds": 2, "min_clients": 2}
    opt = FedOptRecipe(
        min_clients=2,
        model=model,
        train_script=script,
        optimizer_args={"path": "torch.optim.SGD", "args": {"lr": 1.0, "momentum": 0.6}},
    )
    assert opt.strategy_args["server_optimizer"] == "sgd" and opt.strategy_args["server_momentum"] == 0.6
    adam = FedOptRecipe(min_clients=2, model=model, train_script=script, server_optimizer="adam", server_lr=0.01)
    assert adam.strategy_args["server_optimizer"] == "adam" and adam.strategy_args["server_lr"] == 0.01
    cosine = FedOptRecipe(
        min_clients=2,
        num_rounds=4,
        model=model,
        train_script=script,
        lr_scheduler_args={"path": "torch.optim.lr_scheduler.CosineAnnealingLR", "args": {"T_max": "{num_rounds}"}},
    )
    assert cosine.strategy_args["lr_schedule"] == "cosine" and cosine.strategy_args["server_lr_min"] == 0.0
    with pytest.raises(ConfigError, match="lr_scheduler_args"):
        FedOptRecipe(min_clients=2, model=model, train_script=script, lr_scheduler_args={"path": "x.StepLR"})
    with pytest.raises(ConfigError, match="T_max"):
        FedOptRecipe(
            min_clients=2,
            num_rounds=4,
            model=model,
            train_script=script,
            lr_scheduler_args={"path": "torch.optim.lr_scheduler.CosineAnnealingLR", "args": {"T_max": 10}},
        )
    with pytest.raises(ConfigError, match="one way"):
        FedOptRecipe(min_clients=2, model=model, train_script=script, optimizer_args={}, server_optimizer="sgd")
    with pytest.raises(ConfigError, match="fedprox_mu"):
        FedProxRecipe(min_clients=2, model=model, train_script=script, fedprox_mu=-1.0)


def test_flare_optimizer_args_map_to_the_fedopt_strategy() -> None:
    adam = {"path": "torch.optim.Adam", "args": {"lr": 0.1, "betas": (0.9, 0.99), "eps": 1e-3}}
    assert optimizer_from_args(adam) == {
        "server_optimizer": "adam",
        "server_lr": 0.1,
        "betas": [0.9, 0.99],
        "tau": 1e-3,
    }
    assert optimizer_from_args({"class_path": "torch.optim.Adagrad", "args": {}}) == {
        "server_optimizer": "adagrad",
        "server_lr": 1.0,
    }
    with pytest.raises(ConfigError, match="RMSprop"):
        optimizer_from_args({"path": "torch.optim.RMSprop"})
    with pytest.raises(ConfigError, match="weight_decay"):
        optimizer_from_args({"path": "torch.optim.SGD", "args": {"weight_decay": 0.1}})
    with pytest.raises(ConfigError, match="momentum"):
        optimizer_from_args({"path": "torch.optim.Adam", "args": {"momentum": 0.1}})


def test_fedeval_recipe_scores_a_checkpoint_in_the_model(tmp_path: Path) -> None:
    script = seed_job(tmp_path / "src")
    net = tiny_net(tmp_path / "src")
    torch.save({k: torch.ones_like(v) for k, v in net.state_dict().items()}, tmp_path / "pretrained.pt")
    r = FedEvalRecipe(
        min_clients=2, model=net, eval_ckpt=str(tmp_path / "pretrained.pt"), eval_script=script, eval_args="--epochs 1"
    )
    assert r.name == "eval" and r.strategy == "fedeval" and r.train_args == ("--epochs", "1")
    assert all(bool((v == 1).all()) for v in r.model.values())
    with pytest.raises(ConfigError, match="eval_ckpt"):
        FedEvalRecipe(min_clients=2, model=net, eval_ckpt=tmp_path / "nope.pt", eval_script=script)
    with pytest.raises(ConfigError, match="eval_script"):
        FedEvalRecipe(min_clients=2, model=net, eval_ckpt=tmp_path / "pretrained.pt")


def test_sim_env_takes_flare_arguments(tmp_path: Path) -> None:
    env = SimEnv(clients=["alice", "bob"], num_threads=2, workspace_root=tmp_path, log_config="concise")
    assert env.num_clients == 2 and env.clients == ["alice", "bob"] and env.workspace == tmp_path
    assert env.log_level == "warning"
    assert SimEnv(num_clients=3).clients == ["site-1", "site-2", "site-3"]
    assert SimEnv(num_clients=1, log_config="DEBUG").log_level == "debug"
    (tmp_path / "log.json").write_text(json.dumps({"version": 1, "root": {"level": "ERROR"}}))
    assert SimEnv(num_clients=1, log_config=str(tmp_path / "log.json")).log_level == "error"
    for kwargs, match in [
        ({"num_clients": 3, "clients": ["a", "b"]}, "num_clients=3"),
        ({"clients": ["a", "a"]}, "each once"),
        ({"clients": ["bad name"]}, "clients"),
        ({"num_clients": 0}, "num_clients"),
        ({"num_clients": 1, "log_config": "chatty"}, "log_config"),
        ({"num_clients": 1, "log_config": str(tmp_path / "missing.json")}, "log_config"),
        ({"num_clients": 1, "workspace": tmp_path, "workspace_root": tmp_path}, "workspace_root"),
    ]:
        with pytest.raises(ConfigError, match=match):
            SimEnv(**kwargs)


def test_prod_env_takes_the_kit_as_startup_kit_location(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="admin.toml|no such|not"):
        ProdEnv(startup_kit_location=str(tmp_path / "no-kit"))
    with pytest.raises(ConfigError, match="once"):
        ProdEnv(kit=tmp_path, startup_kit_location=tmp_path)


def test_a_strategy_of_ones_own_beside_the_script_ships_with_the_job(tmp_path: Path) -> None:
    script = tiny_script(tmp_path / "src")
    (tmp_path / "src" / "myagg.py").write_text(
        "from fedbus.strategy import FedAvg\n\n\nclass HalfAvg(FedAvg):\n    pass\n\n\nclass NotAStrategy:\n    pass\n"
    )
    r = FedAvgRecipe(name="own", model=tiny_model(), train_script=script, min_clients=2, strategy="myagg:HalfAvg")
    spec = jobs.load_job_folder(r.export(tmp_path / "job"), check_strategy=False)
    assert spec.strategy == "myagg:HalfAvg" and spec.strategy_args["min_clients"] == 2
    assert (tmp_path / "job" / "myagg.py").is_file()
    with pytest.raises(ConfigError, match="NotAStrategy"):
        FedAvgRecipe(name="own", model=tiny_model(), train_script=script, strategy="myagg:NotAStrategy")
    with pytest.raises(ConfigError, match="module:StrategyClass"):
        FedAvgRecipe(name="own", model=tiny_model(), train_script=script, strategy="fedprox")
