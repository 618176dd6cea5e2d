"""Cross-site evaluation on real daemons: a FedAvg job with ``[cross_site_eval]`` trains, asks each site for its
local model, has every site evaluate every model (the final global one as "server", each site's, and a server
model the job folder carries) and ends with the whole site-by-model matrix in the job's download and in
``cross_site_val/cross_val_results.json`` at the broker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fedbus.client
from fedbus.modelio import serde
from tests.broker.harness import federation, wait_job

pytestmark = pytest.mark.timeout(90)

# Training adds the site's offset to every weight; its local model is what it trained last. An evaluation scores
# a model by the sum of its weights plus a tenth of the offset, so every cell of the matrix tells which model and
# which site made it. A task that does not carry what the broker promised ends the script (the cell stays empty).
SCRIPT = """
import sys
import fedbus.client as flare
from fedbus.client import api

flare.init()
offset = {"site-1": 1.0, "site-2": 2.0}[flare.get_site_name()]
local = None
while flare.is_running():
    model = flare.receive()
    kind = flare.get_task_name()
    options = api._get()._current.options
    if kind == "submit_model":
        if options.get("submit_model") is not True or model.params is not None or local is None:
            sys.exit(f"bad submit_model task: options {options!r}")
        flare.send(flare.FLModel(params=local))
    elif kind == "evaluate":
        if "model_name" not in model.meta:
            sys.exit("an evaluate task of cross-site evaluation names its model")
        flare.send(flare.FLModel(metrics={"score": float(model.params["w"].sum()) + offset / 10}))
    else:
        if options.get("submit_model"):
            sys.exit("a training task must not ask for the local model")
        local = {k: v + offset for k, v in model.params.items()}
        flare.send(flare.FLModel(params=local, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""


def _job(folder: Path, strategy: str = 'name = "fedavg"\nmin_clients = 2\nnum_rounds = 1\n') -> Path:
    folder.mkdir()
    (folder / "client.py").write_text(SCRIPT)
    serde.write_file(folder / "model.safetensors", serde.layout({"w": torch.zeros(10)}))
    (folder / "cross_site_models").mkdir()
    pretrained = serde.layout({"w": torch.full((10,), 3.0)})
    serde.write_file(folder / "cross_site_models" / "pretrained.safetensors", pretrained)
    (folder / "job.toml").write_text(
        f'name = "xsite"\nmodel = "model.safetensors"\n\n[strategy]\n{strategy}\n'
        '[script]\npath = "client.py"\n\n[sites]\nmin = 2\nmax = 2\n\n[cross_site_eval]\nenabled = true\n'
    )
    return folder


@pytest.mark.skipif(
    not hasattr(fedbus.client, "is_submit_model"),
    reason="the client API does not send params for submit_model tasks yet (flare.is_submit_model())",
)
async def test_fedavg_with_cross_site_evaluation_ends_with_the_full_matrix(tmp_path: Path) -> None:
    async with federation(tmp_path, sites=2) as (broker, _sites, admin):
        job_id = await admin.submit(_job(tmp_path / "job"))
        job = await wait_job(admin, job_id)
        assert job["state"] == "finished", job["reason"]
        assert "cross-site evaluation: 8 results for 4 models" in job["reason"]
        assert not broker.store.events(job_id, "crashed")
        # The global model after one round is the mean of 1s and 2s: 1.5 per weight, 15 in all.
        expected = {
            "server": {"site-1": 15.1, "site-2": 15.2},
            "site-1": {"site-1": 10.1, "site-2": 10.2},
            "site-2": {"site-1": 20.1, "site-2": 20.2},
            "pretrained": {"site-1": 30.1, "site-2": 30.2},
        }
        data = await admin.download(job_id, tmp_path / "out")
        assert _scores(data["cross_site"]) == expected
        # The cross-site tasks are not training rounds: one version was published, the final one evaluated.
        assert data["version"] == 1 and data["evaluations"] == []
        assert sorted(u["site"] for u in data["updates"] if u["accepted"]) == ["site-1", "site-2"]
        written = broker.store.job_dir(job_id) / "cross_site_val" / "cross_val_results.json"
        assert _scores(json.loads(written.read_text())) == expected


async def test_standalone_evaluation_of_the_job_model_and_a_server_model(tmp_path: Path) -> None:
    """The registered ``cross_site_eval`` strategy: no training, no local models; the job's model as "server"
    and the job folder's server model, each streamed once per site under its name."""
    folder = _job(tmp_path / "job", 'name = "cross_site_eval"\nsubmit_models = false\n')
    async with federation(tmp_path, sites=2) as (broker, _sites, admin):
        job_id = await admin.submit(folder)
        job = await wait_job(admin, job_id)
        assert job["state"] == "finished", job["reason"]
        assert not broker.store.events(job_id, "crashed")
        expected = {"server": {"site-1": 0.1, "site-2": 0.2}, "pretrained": {"site-1": 30.1, "site-2": 30.2}}
        data = await admin.download(job_id, tmp_path / "out")
        assert _scores(data["cross_site"]) == expected and data["updates"] == []
        written = broker.store.job_dir(job_id) / "cross_site_val" / "cross_val_results.json"
        assert _scores(json.loads(written.read_text())) == expected


def _scores(matrix: dict) -> dict:
    """``{model: {site: score}}``, rounded: the metrics every cell holds are exactly ``{"score": ...}``."""
    assert all(set(cell) == {"score"} for row in matrix.values() for cell in row.values()), matrix
    return {m: {s: round(cell["score"], 4) for s, cell in row.items()} for m, row in matrix.items()}
