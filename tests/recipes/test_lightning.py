"""hello-lightning trains federated: ``flare.patch(trainer)`` and the validate/fit loop, 2 sites x 2 rounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

from fedbus.recipes import SimEnv

from .helpers import load_example


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_hello_lightning_trains_two_rounds_on_two_sites(tmp_path: Path) -> None:
    example: Any = load_example("hello_lightning_job", "examples/hello-lightning/job.py")
    run = example.make_recipe(sites=2, rounds=2).execute(SimEnv(2, workspace=tmp_path, progress=False))
    assert run.status == "finished", run.reason
    assert [h["version"] for h in run.history] == [0, 1, 2]
    trains = [u for u in run.updates if u["accepted"]]
    assert len(trains) == 4
    assert all(u["weight"] == 45 for u in trains)  # one epoch of 719 or 718 digits in batches of 16: 45 steps
    # each round's result carries the validation metrics of the global model it started from
    assert 0.0 <= run.history[1]["metrics"]["val_acc"] < run.history[2]["metrics"]["val_acc"]
    final = run.evaluations[-1]
    assert final.version == 2 and sorted(final.sites) == ["site-1", "site-2"]
    assert final.mean["val_acc"] > 0.7
    assert all(t["params_bytes"] == 0 for t in run.tasks if t["kind"] == "evaluate")
