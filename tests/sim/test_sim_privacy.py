"""The job's privacy filters on the simulated clock: exclusion and DP act on every simulated update as at a real
site (seeded, so runs repeat); encryption and secure aggregation are refused with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedbus.errors import ConfigError
from fedbus.recipes import FedAvgRecipe, SimEnv

from .helpers import model, script


def _run(tmp: Path, privacy: dict[str, object], seed: int = 0) -> dict[str, torch.Tensor]:
    recipe = FedAvgRecipe("private", model(), script(tmp / "src"), min_clients=3, num_rounds=1)
    recipe.extra["privacy"] = privacy
    run = recipe.execute(SimEnv(3, clock="simulated", workspace=tmp / "ws", progress=False, seed=seed))
    assert run.status == "finished", run.reason
    assert run.model is not None
    return run.model


@pytest.mark.timeout(60)
def test_exclusion_and_clipping_bound_what_a_simulated_site_sends(tmp_path: Path) -> None:
    plain = _run(tmp_path / "plain", {})
    assert float(plain["w"].norm()) > 0.5 and torch.equal(plain["b"], torch.ones(2))  # each site adds 1 to b
    private = _run(tmp_path / "private", {"exclude": ["b"], "dp_clip": 0.01})
    assert torch.equal(private["b"], torch.zeros(2))  # b never left a site: the global value went instead
    assert 0 < float(private["w"].norm()) <= 0.01 + 1e-6  # the mean of updates clipped to norm 0.01


@pytest.mark.timeout(60)
def test_simulated_dp_noise_repeats_with_the_seed(tmp_path: Path) -> None:
    noisy = {"dp_clip": 1.0, "dp_sigma": 0.5}
    a, b = _run(tmp_path / "a", noisy, seed=5), _run(tmp_path / "b", noisy, seed=5)
    other = _run(tmp_path / "c", noisy, seed=6)
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], other["w"])


def test_encryption_and_secure_aggregation_are_refused_on_the_simulated_clock(tmp_path: Path) -> None:
    he = FedAvgRecipe("he", model(), script(tmp_path / "src"), min_clients=2, num_rounds=1)
    he.extra["privacy"] = {"he": True}
    env = SimEnv(2, clock="simulated", workspace=tmp_path / "ws", progress=False)
    with pytest.raises(ConfigError, match="homomorphic encryption"):
        he.execute(env)
    secure = FedAvgRecipe(
        "sa", model(), script(tmp_path / "src"), min_clients=3, num_rounds=1, secure_aggregation={"threshold": 2}
    )
    with pytest.raises(ConfigError, match="secure aggregation"):
        secure.execute(env)
