"""The worker pool on Ray (``simtime.ray_pool.RayPool``), on a local Ray instance of 2 CPUs started once for the
module: the same seeded simulation gives the same bit-identical model on Ray actors as on threads."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedbus.errors import ConfigError
from fedbus.recipes import FedAvgRecipe, FedBuffRecipe, SimEnv, SpeedProfile
from fedbus.recipes.simtime import ThreadWorkerPool

from .helpers import FLARE_SCRIPT, model, script

ray = pytest.importorskip("ray", reason="the Ray pool needs the optional extra: pip install 'fedbus[ray]'")

from fedbus.recipes.simtime.ray_pool import RayPool  # noqa: E402


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _run(tmp: Path, name: str, recipe: Any, pool: Any) -> Any:
    speed = SpeedProfile.lognormal(1.0, seed=2)
    env = SimEnv(
        6, clock="simulated", workspace=tmp / name, progress=False, seed=11, train_s=5.0, speed=speed, pool=pool
    )
    run = recipe.execute(env)
    assert run.status == "finished", run.reason
    return run


@pytest.mark.timeout(100)
def test_ray_actors_give_the_thread_pools_bit_identical_model(local_ray: None, tmp_path: Path) -> None:
    src = script(tmp_path / "src")

    def recipe() -> FedBuffRecipe:
        return FedBuffRecipe("buff", model(), src, buffer_size=2, concurrency=4, num_versions=5)

    threads = ThreadWorkerPool(2)
    try:
        expected = _run(tmp_path, "threads", recipe(), threads)
    finally:
        threads.close()
    pool = RayPool(None, 2, num_cpus=1)
    try:
        assert pool.devices == []  # no job yet
        on_ray = _run(tmp_path, "ray", recipe(), pool)
        assert pool.devices == ["cpu", "cpu"]
        pool.models = "inline"  # the same actors, each task carrying its model
        inline = _run(tmp_path, "inline", recipe(), pool)
        flare = FedAvgRecipe("flare", model(), script(tmp_path / "flare", FLARE_SCRIPT), min_clients=3, num_rounds=2)
        flare_run = _run(tmp_path, "flare", flare, pool)
        # an actor that dies (here: its script exits the process) fails its task as the site's crash
        dying = FedAvgRecipe("dies", model(), script(tmp_path / "dies", DYING), min_clients=1, num_rounds=1)
        died = dying.execute(SimEnv(1, clock="simulated", workspace=tmp_path / "dies-ws", progress=False, pool=pool))
    finally:
        pool.close()
    for run in (on_ray, inline):
        assert all(torch.equal(run.model[k], expected.model[k]) for k in expected.model)
        assert [u["site"] for u in run.updates] == [u["site"] for u in expected.updates]
    assert flare_run.model is not None and flare_run.model["w"].abs().sum() > 0
    failed = [u for u in died.updates if not u["accepted"]]
    assert failed and "failed the task" in failed[0]["reason"], died.updates


DYING = "import os\n\ndef run_task(site, model):\n    os._exit(3)\n"


@pytest.mark.timeout(60)
def test_simenv_pointed_at_ray_trains_on_actors_it_makes_and_stops(local_ray: None, tmp_path: Path) -> None:
    recipe = FedAvgRecipe("auto", model(), script(tmp_path / "src"), min_clients=3, num_rounds=2)
    env = SimEnv(3, clock="simulated", ray="auto", num_threads=1, workspace=tmp_path / "ws", progress=False, seed=11)
    run = recipe.execute(env)
    assert run.status == "finished", run.reason
    assert run.model is not None and run.model["w"].abs().sum() > 0
    assert ray.is_initialized()  # the connection was this module's: the pool left it open
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # a killed actor gives its CPU back asynchronously
    assert ray.available_resources().get("CPU", 0) == 2  # SimEnv's own pool was closed with the run


def test_ray_pool_options_are_checked(local_ray: None) -> None:
    for kw in ({"workers": 0}, {"num_cpus": -1}, {"num_gpus": 1.5}, {"models": "bus"}, {"torch_threads": 0}):
        with pytest.raises(ConfigError):
            RayPool(None, **kw)  # type: ignore[arg-type]
