"""examples/async-experiment: the Dirichlet partition, the model helpers, and a tiny run of the driver."""

from __future__ import annotations

import csv
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

pytest.importorskip("sklearn")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "async-experiment"
MODULES = ("data", "model", "client", "run")


@pytest.fixture(scope="module")
def example() -> Iterator[dict[str, ModuleType]]:
    """The example's modules, imported from its folder; sys.path and sys.modules put back afterwards."""
    saved = {name: sys.modules.pop(name) for name in MODULES if name in sys.modules}
    sys.path.insert(0, str(EXAMPLE))
    try:
        yield {name: importlib.import_module(name) for name in ("data", "model")}
    finally:
        sys.path.remove(str(EXAMPLE))
        for name in MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def _labels(n_per_class: int = 100, classes: int = 10) -> np.ndarray:
    return np.repeat(np.arange(classes), n_per_class)


def _skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each site's label histogram and the global one (0: IID)."""
    classes = labels.max() + 1
    overall = np.bincount(labels, minlength=classes) / len(labels)
    tv = [0.5 * np.abs(np.bincount(labels[p], minlength=classes) / len(p) - overall).sum() for p in parts]
    return float(np.mean(tv))


@pytest.mark.parametrize("alpha", [0.01, 0.3, 1.0, 100.0])
def test_partition_is_disjoint_and_covers_everything(example: dict[str, ModuleType], alpha: float) -> None:
    labels = _labels()
    parts = example["data"].dirichlet_partition(labels, 20, alpha, seed=3)
    assert len(parts) == 20
    joined = np.concatenate(parts)
    assert len(joined) == len(labels)  # nothing twice
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))  # nothing left out


@pytest.mark.parametrize("alpha", [0.01, 0.1])
def test_every_site_gets_a_few_samples_even_for_tiny_alpha(example: dict[str, ModuleType], alpha: float) -> None:
    data = example["data"]
    parts = data.dirichlet_partition(_labels(), 50, alpha, seed=0)
    assert min(len(p) for p in parts) >= data.MIN_SAMPLES


def test_small_alpha_skews_labels_large_alpha_is_near_uniform(example: dict[str, ModuleType]) -> None:
    labels = _labels()
    partition = example["data"].dirichlet_partition
    skewed = _skew(labels, partition(labels, 10, 0.05, seed=0))
    uniform = _skew(labels, partition(labels, 10, 1000.0, seed=0))
    assert skewed > 0.6, skewed
    assert uniform < 0.12, uniform
    dominant = [np.bincount(labels[p]).max() / len(p) for p in partition(labels, 10, 0.05, seed=0)]
    assert np.mean(dominant) > 0.6  # a site is mostly one or two classes


def test_partition_is_deterministic_per_seed(example: dict[str, ModuleType]) -> None:
    labels = _labels()
    partition = example["data"].dirichlet_partition
    a, b = partition(labels, 20, 0.3, seed=7), partition(labels, 20, 0.3, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    c = partition(labels, 20, 0.3, seed=8)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_partition_refuses_impossible_requests(example: dict[str, ModuleType]) -> None:
    partition = example["data"].dirichlet_partition
    with pytest.raises(ValueError, match="alpha"):
        partition(_labels(), 5, 0.0, seed=0)
    with pytest.raises(ValueError, match="cannot give"):
        partition(_labels(5), 10, 1.0, seed=0)


def test_sites_never_see_the_held_out_digits(example: dict[str, ModuleType]) -> None:
    data = example["data"]
    pool, heldout = data.split_indices()
    assert len(np.intersect1d(pool, heldout)) == 0
    assert len(pool) + len(heldout) == 1797
    assert len(heldout) == pytest.approx(0.2 * 1797, abs=1)
    parts = data.partition(20, 0.3, seed=0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.sort(pool))
    x, y = data.site_data(4, 20, 0.3, seed=0)
    x_all, y_all = data._digits()
    assert np.array_equal(x, x_all[parts[4]]) and np.array_equal(y, y_all[parts[4]])
    assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0  # pixels / 16
    with pytest.raises(ValueError, match="site_index"):
        data.site_data(20, 20, 0.3, seed=0)


def test_evaluate_takes_a_module_or_a_state_dict(example: dict[str, ModuleType]) -> None:
    model, data = example["model"], example["data"]
    x, y = data.heldout()
    net = model.make_model(0)
    acc = model.evaluate(net, x, y)
    assert 0.0 <= acc <= 1.0
    assert model.evaluate(net.state_dict(), x, y) == acc
    same = model.make_model(0).state_dict()
    assert all(np.array_equal(v.numpy(), net.state_dict()[k].numpy()) for k, v in same.items())


@pytest.mark.timeout(120)
def test_driver_writes_csv_plot_and_json_line(
    example: dict[str, ModuleType], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("fedbus.recipes")
    pytest.importorskip("matplotlib")
    run = importlib.import_module("run")
    out = tmp_path / "out"
    argv = ["--sites", "6", "--budget", "3", "--step-ms", "5", "--out", str(out)]
    result = run.main(argv)

    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == result  # the last line of stdout is the JSON object
    for key in (
        "fedavg_s_to_target",
        "fedbuff_s_to_target",
        "ratio",
        "target",
        "fedavg_final_acc",
        "fedbuff_final_acc",
        "fedavg_updates",
        "fedbuff_updates",
    ):
        assert key in result
    assert result["target"] == 0.9
    assert result["fedavg_updates"] > 0 and result["fedbuff_updates"] > 0
    assert 0.0 <= result["fedbuff_final_acc"] <= 1.0

    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["strategy"] for r in rows} == {"fedavg", "fedbuff"}
    for strategy in ("fedavg", "fedbuff"):
        mine = [r for r in rows if r["strategy"] == strategy]
        assert [int(r["version"]) for r in mine] == list(range(len(mine)))
        assert len(mine) >= 2  # version 0 and at least one aggregated version
        wall = [float(r["wall_s"]) for r in mine]
        assert wall == sorted(wall)
    assert any(r["mean_staleness"] for r in rows if r["strategy"] == "fedbuff" and r["version"] != "0")
    png = (out / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
