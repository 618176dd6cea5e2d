"""One recipe, three doors: SimEnv, PocEnv and ProdEnv run the same recipe object to the same result;
PocEnv leaves no process behind, whatever way the run ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedbus.recipes import FedAvgRecipe, PocEnv, ProdEnv, Progress, SimEnv

from ..e2e import procs
from .helpers import alive, descendants, load_example, tiny_model, tiny_script


@pytest.mark.timeout(240)
def test_the_same_recipe_runs_in_sim_poc_and_prod(tmp_path: Path) -> None:
    hello: Any = load_example("hello_pt_job", "examples/hello-pt/job.py")
    recipe = hello.make_recipe(sites=3, rounds=2, evaluate=False)

    # ProdEnv: a broker and three sites started separately (as an operator would). Its job is submitted
    # first and runs while the other two environments run theirs: the three overlap to save wall time.
    (tmp_path / "prod").mkdir()
    with procs.federation(tmp_path / "prod", sites=3) as (broker, address, sites):
        prod_env = ProdEnv(address, workspace=tmp_path / "prod-results", progress=False)
        prod_env.poll_s = 0.2
        handle = recipe.execute(prod_env, wait=False)
        assert handle.status == "running"  # returned at once

        sim = recipe.execute(SimEnv(3, workspace=tmp_path / "sim", progress=False))

        theirs = {d.proc.pid for d in [broker, *sites]}
        seen: set[int] = set()
        poc = recipe.execute(PocEnv(3, workspace=tmp_path / "poc", progress=lambda p: seen.update(descendants(theirs))))
        assert len(seen) >= 7 and not alive(seen), "PocEnv left processes behind after success"

        prod = handle.wait(timeout=120)

    accuracies = {}
    for name, run in (("sim", sim), ("poc", poc), ("prod", prod)):
        assert run.status == "finished", (name, run.reason)
        assert [h["version"] for h in run.history] == [0, 1, 2], name
        assert sum(u["accepted"] for u in run.updates) == 6, name
        accuracies[name] = hello.heldout_accuracy(run)
    assert min(accuracies.values()) > 0.8, accuracies
    assert max(accuracies.values()) - min(accuracies.values()) < 0.05, accuracies
    assert len(poc.tasks) == 6 and poc.timing["overhead_s"] > 0  # the sites' own records, from their logs
    assert len(prod.checkpoints) == 1 and prod.checkpoints[0][2] == prod.model_path  # only the final model travels


def _watching(seen: set[int], stop_at_version: int | None = None) -> Any:
    def progress(p: Progress) -> None:
        seen.update(descendants())
        if stop_at_version is not None and p.version >= stop_at_version:
            raise KeyboardInterrupt

    return progress


@pytest.mark.timeout(120)
def test_poc_env_leaves_no_process_after_a_failed_job(tmp_path: Path) -> None:
    (tmp_path / "exit3.py").write_text("import sys\nsys.exit(3)\n")  # fails before it even imports fedbus
    recipe = FedAvgRecipe("crash", tiny_model(), tmp_path / "exit3.py", min_clients=1, num_rounds=2)
    seen: set[int] = set()
    run = recipe.execute(PocEnv(1, workspace=tmp_path / "ws", progress=_watching(seen)))
    assert run.status == "failed" and "1 failed" in run.reason, run.reason
    assert len(seen) >= 2 and not alive(seen)


@pytest.mark.timeout(120)
def test_poc_env_leaves_no_process_after_a_keyboard_interrupt(tmp_path: Path) -> None:
    recipe = FedAvgRecipe("long", tiny_model(), tiny_script(tmp_path / "src"), ["slow"], min_clients=1, num_rounds=1000)
    seen: set[int] = set()
    with pytest.raises(KeyboardInterrupt):
        recipe.execute(PocEnv(1, workspace=tmp_path / "ws", progress=_watching(seen, stop_at_version=1)))
    assert len(seen) >= 3 and not alive(seen)  # broker, site and the site's training script
