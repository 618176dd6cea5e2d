"""The process worker pool (``simtime.process_pool``): a script drawing from torch's global generator gives the
same model on two worker processes as on the one-thread pool."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedbus.recipes import FedBuffRecipe, SimEnv
from fedbus.recipes.simtime import ThreadWorkerPool
from fedbus.recipes.simtime.process_pool import ProcessWorkerPool

from .helpers import model, script

GLOBAL_RNG_SCRIPT = """
import torch
import fedbus.client as flare

def run_task(site, model):
    noise = torch.randn(model.params["w"].shape)  # torch's global generator, no site.generator
    w = model.params["w"] + 0.1 * noise + site.index
    return flare.FLModel(params={"w": w, "b": model.params["b"]},
                         meta={"NUM_STEPS_CURRENT_ROUND": 1})
"""


@pytest.mark.timeout(90)
def test_global_rng_scripts_give_one_workers_model_on_two_processes(tmp_path: Path) -> None:
    src = script(tmp_path / "src", GLOBAL_RNG_SCRIPT)
    models = []
    for pool in (ThreadWorkerPool(1), ProcessWorkerPool(2)):
        try:
            recipe = FedBuffRecipe("rng", model(), src, buffer_size=2, concurrency=4, num_versions=4)
            env = SimEnv(5, clock="simulated", workspace=tmp_path / str(len(models)), progress=False, seed=4, pool=pool)
            run = recipe.execute(env)
        finally:
            pool.close()
        assert run.status == "finished", run.reason
        assert run.model is not None
        models.append(run.model)
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    assert models[0]["w"].abs().sum() > 0
