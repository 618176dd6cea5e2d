"""The async experiment's large mode (``run.py --large``), shrunk: both strategies on simulated time."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

from tests.recipes.helpers import load_example


@pytest.mark.timeout(90)
def test_the_large_mode_compares_both_strategies_on_simulated_hours(tmp_path: Path) -> None:
    large = load_example("async_large", "examples/async-experiment/large.py")
    argv = ["--sites", "40", "--sim-hours", "0.1", "--concurrency", "8", "--buffer-size", "2", "--per-round", "8"]
    path = list(sys.path)
    try:
        first = large.main([*argv, "--out", str(tmp_path / "a")])  # type: ignore[attr-defined]
    finally:
        sys.path[:] = path
    for name in ("fedavg", "fedbuff"):
        assert first[name]["status"] == "finished" and first[name]["updates"] > 0
    assert first["fedbuff"]["versions"] > first["fedavg"]["versions"]  # no barrier: many more versions per hour
    rows = list(csv.DictReader((tmp_path / "a" / "metrics-large.csv").read_text().splitlines()))
    assert {r["strategy"] for r in rows} == {"fedavg", "fedbuff"}
    assert max(float(r["sim_h"]) for r in rows) <= 0.1
    assert (tmp_path / "a" / "accuracy-large.png").stat().st_size > 0
