"""The hello-pt example: local training learns, client.py is train.py plus client-API lines, the job loads."""

from __future__ import annotations

import ast
import difflib
import importlib
import sys
from pathlib import Path

import pytest
import torch

from fedbus.jobs import load_job_folder
from fedbus.modelio import serde

JOB = Path(__file__).resolve().parents[1] / "examples" / "hello-pt" / "job"


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch):
    """The job folder's modules, imported the way the site runs them (the script's folder on sys.path)."""
    monkeypatch.syspath_prepend(str(JOB))
    for name in ("net", "train"):
        sys.modules.pop(name, None)
    yield importlib.import_module("net"), importlib.import_module("train")
    for name in ("net", "train"):
        sys.modules.pop(name, None)


def test_partitions_are_disjoint_and_cover_the_split(example) -> None:
    net, _ = example
    train_sets, test_sets = [], []
    for i in range(3):
        tr, te = net.load_partition(i, 3)
        train_sets.append({tuple(x.flatten().tolist()) for x in tr.dataset.tensors[0]})
        test_sets.append(len(te.dataset))
    assert sum(len(s) for s in train_sets) >= 1400  # 80% of 1,797, less a few duplicate images
    assert sum(test_sets) == len(net.heldout_loader().dataset) == 1797 // 5
    with pytest.raises(ValueError):
        net.load_partition(3, 3)


def test_one_site_one_epoch_beats_chance(example, capsys: pytest.CaptureFixture[str]) -> None:
    net, train = example
    torch.manual_seed(0)
    train_loader, test_loader = net.load_partition(0, 3)
    model = net.Net()
    steps = train.train(model, train_loader, epochs=1, lr=0.01)
    assert steps == len(train_loader)
    assert net.evaluate(model, test_loader) > 0.3  # chance is 0.1
    assert net.evaluate(model, net.heldout_loader()) > 0.3
    train.main(["--epochs", "1", "--site-index", "1", "--num-sites", "3"])
    assert "site-2: accuracy" in capsys.readouterr().out


def test_the_initial_model_matches_net(example) -> None:
    net, _ = example
    net.Net().load_state_dict(serde.read_file(JOB / "model.safetensors"))  # strict: same names and shapes


def test_the_job_folder_loads() -> None:
    spec = load_job_folder(JOB)
    assert (spec.name, spec.strategy, spec.script, spec.min_sites) == ("hello-pt", "fedavg", "client.py", 3)
    assert spec.strategy_args == {"min_clients": 3, "num_rounds": 3}
    assert spec.script_args == ("--epochs", "1")


def _code_lines(path: Path) -> list[str]:
    """Source lines without the module docstring, stripped of indentation (the diff -w view)."""
    text = path.read_text()
    doc = ast.get_docstring(ast.parse(text), clean=False)
    if doc is not None:
        text = text.split('"""', 2)[2]
    return [line.strip() for line in text.splitlines() if line.strip()]


def test_client_differs_from_train_only_in_client_api_lines() -> None:
    diff = difflib.ndiff(_code_lines(JOB / "train.py"), _code_lines(JOB / "client.py"))
    changed = [line[2:] for line in diff if line[:2] in ("- ", "+ ")]
    non_api = [line for line in changed if "flare" not in line]
    assert non_api == [
        'site, site_index, num_sites = f"site-{args.site_index + 1}", args.site_index, args.num_sites',
        "last_params = None",  # kept for cross-site evaluation's submit_model task
        "continue",
        "model.load_state_dict(input_model.params)",
        "continue",
        'meta = {"NUM_STEPS_CURRENT_ROUND": steps}',
        "last_params = {k: v.clone() for k, v in model.state_dict().items()}",
    ]
