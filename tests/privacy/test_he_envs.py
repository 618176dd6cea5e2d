"""An encrypted recipe in SimEnv and PocEnv: the environment makes the execution's CKKS context (the sites' with
the secret key, the broker's without), the broker folds ciphertexts, and the run's model is the decrypted FedAvg."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedbus.modelio import serde
from fedbus.recipes import FedAvgRecipe, PocEnv, SimEnv

SCRIPT = """
import torch
import fedbus.client as flare

flare.init()
index = int(flare.get_site_name().rsplit("-", 1)[1])
while flare.is_running():
    model = flare.receive()
    w = model.params["w"] + torch.full_like(model.params["w"], float(index))
    flare.send(flare.FLModel(params={"w": w}, meta={"NUM_STEPS_CURRENT_ROUND": index}))
"""


def _recipe(tmp: Path) -> FedAvgRecipe:
    (tmp / "src").mkdir(parents=True)
    (tmp / "src" / "client.py").write_text(SCRIPT)
    recipe = FedAvgRecipe("he", {"w": torch.zeros(5000)}, tmp / "src" / "client.py", min_clients=2, num_rounds=2)
    recipe.extra["privacy"] = {"he": True}
    return recipe


def _check(run: object, workspace: Path) -> None:
    assert run.status == "finished", run.reason  # type: ignore[attr-defined]
    # weights 1 and 2: each round adds (1 * 1 + 2 * 2) / 3 to every value
    torch.testing.assert_close(run.model["w"], torch.full((5000,), 2 * 5 / 3), atol=1e-4, rtol=0)  # type: ignore[attr-defined]
    final = serde.read_file(run.model_path)  # type: ignore[attr-defined]
    assert final["w"].dtype == torch.uint8  # what the broker kept: ciphertexts
    broker_keys = list((workspace / "he-keys" / "broker").iterdir())
    assert [p.name for p in broker_keys] == ["he_context.public"]
    assert (workspace / "he-keys" / "sites" / "he_context.secret").stat().st_mode & 0o077 == 0


@pytest.mark.timeout(90)
def test_an_encrypted_recipe_runs_in_simenv(tmp_path: Path) -> None:
    run = _recipe(tmp_path).execute(SimEnv(2, workspace=tmp_path / "ws", progress=False))
    _check(run, tmp_path / "ws")


@pytest.mark.timeout(120)
def test_an_encrypted_recipe_runs_in_pocenv(tmp_path: Path) -> None:
    run = _recipe(tmp_path).execute(PocEnv(2, workspace=tmp_path / "ws", progress=False))
    _check(run, tmp_path / "ws")
