"""SimEnv on a simulated clock: the real broker, sites as records, reproducible runs, staleness, availability."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedbus.recipes import FedAvgRecipe, FedBuffRecipe, SimEnv, SpeedProfile
from fedbus.recipes.simtime import Availability

from .helpers import FLARE_SCRIPT, model, script


def _env(tmp: Path, n: int, **kw: object) -> SimEnv:
    return SimEnv(n, clock="simulated", workspace=tmp, progress=False, **kw)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_seeded_fedavg_and_fedbuff_runs_are_bit_identical_whatever_the_workers(tmp_path: Path) -> None:
    src = script(tmp_path / "src")
    speed = SpeedProfile.lognormal(1.0, seed=3)
    for make in (
        lambda: FedAvgRecipe("avg", model(), src, min_clients=6, num_rounds=3, max_clients=6),
        lambda: FedBuffRecipe("buff", model(), src, buffer_size=3, concurrency=4, num_versions=5),
    ):
        runs = [
            make().execute(_env(tmp_path / f"ws-{i}", 8, num_threads=workers, speed=speed, seed=7, train_s=5.0))
            for i, workers in enumerate((1, 2))
        ]
        for run in runs:
            assert run.status == "finished", run.reason
        a, b = runs
        assert a.model is not None and b.model is not None
        assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
        decisions = [
            [(u["task_id"].rsplit(".", 1)[0], u["accepted"], u.get("staleness")) for u in r.updates] for r in runs
        ]
        assert decisions[0] == decisions[1]
        assert [h["sim_time"] for h in a.history] == [h["sim_time"] for h in b.history]
    other = FedAvgRecipe("avg", model(), src, min_clients=6, num_rounds=3, max_clients=6).execute(
        _env(tmp_path / "ws-seed", 8, speed=speed, seed=8, train_s=5.0)
    )
    assert other.model is not None and not torch.equal(other.model["w"], a.model["w"])  # the seed matters


@pytest.mark.timeout(60)
def test_a_site_ten_times_slower_arrives_as_stale_as_simulated_time_implies(tmp_path: Path) -> None:
    # Four sites, concurrency 4, K=1: every fast result (10 s) makes a version. The slow site's first result
    # lands at 100 s, after the fast sites' 3 x 10 results at 10, 20, ... 100 s: staleness 30 (or 29 by a tie).
    recipe = FedBuffRecipe("stale", model(), script(tmp_path / "src"), buffer_size=1, concurrency=4, num_versions=40)
    run = recipe.execute(_env(tmp_path / "ws", 4, speed=SpeedProfile.fixed([1, 1, 1, 10]), train_s=10.0))
    assert run.status == "finished", run.reason
    slow = [u for u in run.updates if u["site"] == "site-4" and u["accepted"]]
    assert slow, run.updates
    assert slow[0]["staleness"] in (29, 30)
    fast = [u["staleness"] for u in run.updates if u["site"] != "site-4" and u["accepted"]]
    assert max(fast) <= 3  # a fast site trains while the two other fast sites publish
    times = [h["sim_time"] for h in run.history if h["version"] > 0]
    assert times == sorted(times) and times[0] == pytest.approx(10.0)


@pytest.mark.timeout(90)
def test_ten_thousand_registered_sites_cost_records_and_train_a_few_updates(tmp_path: Path) -> None:
    recipe = FedBuffRecipe("many", model(), script(tmp_path / "src"), buffer_size=5, concurrency=20, num_versions=4)
    env = _env(tmp_path / "ws", 10_000, speed=SpeedProfile.lognormal(0.5, seed=1), train_s=30.0)
    run = recipe.execute(env)
    assert run.status == "finished", run.reason
    accepted = [u for u in run.updates if u["accepted"]]
    assert len(accepted) >= 20 and len({u["site"] for u in accepted}) >= 20
    assert run.version == 4


@pytest.mark.timeout(60)
def test_a_site_that_goes_away_loses_its_task_as_in_production(tmp_path: Path) -> None:
    # site-3 leaves at 5 s, mid-task (tasks take 10 s), and is back at 25 s, in round 3 (20-30 s).
    trace = Availability.trace([(5.0, "site-3", 0), (25.0, "site-3", 1)])
    recipe = FedAvgRecipe("away", model(), script(tmp_path / "src"), min_clients=2, num_rounds=4)
    run = recipe.execute(_env(tmp_path / "ws", 3, availability=trace, train_s=10.0))
    assert run.status == "finished", run.reason
    # Round 1 closed at 10 s with the two others: the broker declared site-3 gone and FedAvg dropped its task.
    rounds = [(h["version"], h["sim_time"], h["metrics"].get("strategy/num_updates")) for h in run.history[1:]]
    assert rounds == [(1, 10.0, 2.0), (2, 20.0, 2.0), (3, 30.0, 2.0), (4, 40.0, 3.0)]
    # Back mid-round, it waits for the next round, as a site rejoining a real FedAvg job does.
    site3 = [(u["version"], u["accepted"]) for u in run.updates if u["site"] == "site-3"]
    assert site3 == [(3, 1)]
    assert [(t["sim_start"], t["sim_end"]) for t in run.tasks if t["site"] == "site-3"] == [(30.0, 40.0)]


CRASHING = """
import fedbus.client as flare

def run_task(site, model):
    if site.name == "site-2":
        raise RuntimeError("this site's script is broken")
    return flare.FLModel(params=model.params, meta={"NUM_STEPS_CURRENT_ROUND": 1})
"""


@pytest.mark.timeout(60)
def test_a_crashing_script_fails_its_task_and_drops_its_site(tmp_path: Path) -> None:
    recipe = FedAvgRecipe("crash", model(), script(tmp_path / "src", CRASHING), min_clients=2, num_rounds=2)
    run = recipe.execute(_env(tmp_path / "ws", 3, train_s=1.0))
    assert run.status == "finished", run.reason
    failed = [u for u in run.updates if u["site"] == "site-2"]
    assert len(failed) == 1 and not failed[0]["accepted"] and "this site's script is broken" in failed[0]["reason"]
    assert [h["metrics"].get("strategy/num_updates") for h in run.history[1:]] == [2.0, 2.0]


@pytest.mark.timeout(60)
def test_measured_training_time_scales_by_the_speed_factor(tmp_path: Path) -> None:
    recipe = FedAvgRecipe("measured", model(), script(tmp_path / "src"), min_clients=2, num_rounds=1)
    run = recipe.execute(_env(tmp_path / "ws", 2, train_s=None, speed=SpeedProfile.fixed([1.0, 1000.0])))
    assert run.status == "finished", run.reason
    by_site = {t["site"]: t for t in run.tasks}
    slow, fast = by_site["site-2"], by_site["site-1"]
    # train_s is recorded to the microsecond: times 1000, that is half a millisecond of simulated time
    assert slow["sim_end"] - slow["sim_start"] == pytest.approx(1000.0 * slow["train_s"], rel=1e-3, abs=1e-3)
    assert fast["sim_end"] - fast["sim_start"] == pytest.approx(fast["train_s"], rel=1e-3, abs=1e-5)
    assert run.history[-1]["sim_time"] == pytest.approx(slow["sim_end"])


@pytest.mark.timeout(60)
def test_a_flare_style_script_runs_once_per_task(tmp_path: Path) -> None:
    recipe = FedAvgRecipe("flare", model(), script(tmp_path / "src", FLARE_SCRIPT), min_clients=3, num_rounds=2)
    run = recipe.execute(_env(tmp_path / "ws", 3, train_s=1.0))
    assert run.status == "finished", run.reason
    assert run.model is not None
    assert torch.allclose(run.model["w"], torch.full((8,), 2.0), atol=0.1)  # mean of site indices 0, 1, 2, twice
    assert [h["sim_time"] for h in run.history] == [0.0, 1.0, 2.0]


@pytest.mark.timeout(60)
def test_a_site_keeps_its_state_between_its_tasks(tmp_path: Path) -> None:
    recipe = FedAvgRecipe("state", model(), script(tmp_path / "src"), min_clients=3, num_rounds=3)
    run = recipe.execute(_env(tmp_path / "ws", 3, num_threads=2, train_s=1.0))
    assert run.status == "finished", run.reason
    # every site counts its own tasks in site.state: the n-th round's mean count is n
    assert [h["metrics"]["tasks_here"] for h in run.history[1:]] == [1.0, 2.0, 3.0]
