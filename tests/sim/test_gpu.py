"""Simulated sites trained on CUDA (``SimEnv(gpus=...)``, ``simtime.gpu``): several workers per device, the model
straight from the bus to the GPU and back once. The CUDA tests run where torch sees a GPU (the device host)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedbus.errors import ConfigError
from fedbus.modelio import serde
from fedbus.recipes import FedAvgRecipe, FedBuffRecipe, SimEnv
from fedbus.recipes.simtime import JobCode, SiteTask
from fedbus.recipes.simtime.gpu import GpuWorkerPool, Staging, load_model, run_on_device, to_host

from .helpers import script

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the device host)")

GPU_SCRIPT = """
import torch
import fedbus.client as flare

def run_task(site, model):
    w, b = model.params["w"], model.params["b"]
    assert w.device == site.device and b.device == site.device, (w.device, site.device)
    x = torch.randn(32, w.shape[0], generator=site.generator).to(site.device)  # the site's batch, drawn on the CPU
    y = x.sum(1, keepdim=True) * (site.index % 3)
    for _ in range(4):
        err = x @ w + b - y
        w = w - 0.05 * (x.T @ err) / len(x)
        b = b - 0.05 * err.mean(0)
    return flare.FLModel(params={"w": w, "b": b}, meta={"NUM_STEPS_CURRENT_ROUND": 4})
"""


def _model() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(16, 1), "b": torch.zeros(1)}


def test_simenv_checks_the_gpu_options(tmp_path: Path) -> None:
    for bad in ({"gpus": 0}, {"gpus": [0, 0]}, {"gpus": "all"}, {"gpus": [-1]}, {"workers_per_gpu": 0}):
        kw = {"gpus": 1, **bad} if "workers_per_gpu" in bad else bad
        with pytest.raises(ConfigError):
            SimEnv(2, clock="simulated", **kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="clock='simulated'"):
        SimEnv(2, gpus="auto")
    with pytest.raises(ConfigError, match="not both"):
        SimEnv(2, clock="simulated", gpus="auto", pool=GpuPoolStandIn())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not 'auto'"):
        SimEnv(2, clock="simulated", gpus="auto", ray="auto")


class GpuPoolStandIn:
    """Any object given as ``pool`` (the option check looks at nothing else)."""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fall-back where no CUDA device is visible")
@pytest.mark.timeout(60)
def test_gpus_auto_without_a_gpu_trains_on_the_cpu_threads(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not visible"):
        GpuWorkerPool(1)
    src = script(tmp_path / "src", GPU_SCRIPT)
    recipe = FedAvgRecipe("auto", _model(), src, min_clients=3, num_rounds=2)
    run = recipe.execute(SimEnv(3, clock="simulated", gpus="auto", workspace=tmp_path / "ws", progress=False))
    assert run.status == "finished", run.reason
    assert run.model is not None and run.model["w"].abs().sum() > 0


@needs_cuda
def test_a_model_goes_to_the_device_as_views_of_one_buffer_and_comes_back_once() -> None:
    device = torch.device("cuda", 0)
    sd = {
        "f32": torch.randn(7, 3),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "i64": torch.arange(9),
        "mask": torch.tensor([True, False, True]),
    }
    on_gpu = load_model(serde.save_bytes(sd), device, Staging())
    torch.cuda.synchronize()
    assert {v.device for v in on_gpu.values()} == {device}
    assert len({v.untyped_storage().data_ptr() for v in on_gpu.values()}) == 1  # one transfer, one buffer
    assert all(torch.equal(on_gpu[k].cpu(), sd[k]) for k in sd)
    back = to_host({k: v * 2 if v.dtype != torch.bool else v for k, v in on_gpu.items()})
    assert all(v.device.type == "cpu" and v.is_pinned() for v in back.values())
    assert len({v.untyped_storage().data_ptr() for v in back.values()}) == 1
    assert torch.equal(back["f32"], sd["f32"] * 2) and torch.equal(back["mask"], sd["mask"])


@needs_cuda
@pytest.mark.timeout(90)
def test_sites_train_on_the_gpu_several_workers_per_device_reproducibly(tmp_path: Path) -> None:
    src = script(tmp_path / "src", GPU_SCRIPT)
    models = {}
    for name, kw in (("cpu", {}), ("gpu1", {"gpus": 1, "workers_per_gpu": 1}), ("gpu3", {"gpus": "auto"})):
        recipe = FedBuffRecipe(name, _model(), src, buffer_size=3, concurrency=6, num_versions=6)
        env = SimEnv(8, clock="simulated", workspace=tmp_path / name, progress=False, seed=5, train_s=10.0, **kw)
        run = recipe.execute(env)  # type: ignore[arg-type]
        assert run.status == "finished", run.reason
        assert run.model is not None
        models[name] = run.model
    assert all(torch.equal(models["gpu1"][k], models["gpu3"][k]) for k in models["cpu"])  # whatever the workers
    assert all(torch.allclose(models["gpu1"][k], models["cpu"][k], atol=1e-4) for k in models["cpu"])
    assert models["cpu"]["w"].abs().sum() > 0


@needs_cuda
@pytest.mark.timeout(60)
def test_a_worker_that_releases_memory_leaves_nothing_on_the_device(tmp_path: Path) -> None:
    device = torch.device("cuda", 0)
    src = script(tmp_path / "job", GPU_SCRIPT)
    job = JobCode("release", src.parent, src.name, (), 4)
    task = SiteTask("release", "t.1", "site-2", 1, "train", 0, 0, 1, serde.save_bytes(_model()), None, {}, seed=3)
    stream, staging = torch.cuda.Stream(device), Staging()
    # A first task makes what a worker keeps for its life (cuBLAS's workspace for its stream), not per task.
    assert run_on_device(job, task, device, stream, staging, release_memory=True).error is None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    outcome = run_on_device(job, task, device, stream, staging, release_memory=True)
    assert outcome.error is None, outcome.error
    assert outcome.params is not None and all(v.device.type == "cpu" for v in outcome.params.values())
    assert torch.cuda.memory_allocated(device) == allocated and torch.cuda.memory_reserved(device) <= reserved
