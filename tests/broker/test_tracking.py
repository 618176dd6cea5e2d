"""Experiment tracking at the broker: sites' records (``flare.log`` and the richer tracking records, sent by real
child-process scripts through the real site relay) land in the job's TensorBoard event files, MLflow file store
and W&B offline runs, read back with each tool's own reader; the best global model by ``key_metric``; records
that fail the checks are refused; a job without ``[tracking]`` writes no tracking files."""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from fedbus.broker import tracking
from fedbus.broker.tracking import BEST_MODEL, best_version, check_record
from fedbus.errors import FedbusError
from fedbus.modelio import serde
from tests.broker.harness import federation, wait_job

pytestmark = pytest.mark.timeout(90)

HAS = {kind: importlib.util.find_spec(kind) is not None for kind in ("tensorboard", "mlflow", "wandb")}
# per round, the accuracy each site reports for the global model it received: version r's (FLARE's convention).
# Version 0 (the initial model) is never chosen; version 2, rated 0.9 (published with version 3), is the best.
ACCURACY = [0.95, 0.5, 0.9, 0.7]

# Each site logs with flare.log (the {key, value, step} shape) and sends the richer records (kind, writer) the
# client's tracking writers send, plus two records the broker must refuse (a list, a key over 256 characters).
SCRIPT = """
import fedbus.client as flare
from fedbus.client.api import _get
from fedbus.protocol.messages import JobEvent

ACCURACY = %r

def raw(**data):
    session = _get()
    session._require().send(JobEvent(job_id=session.job_id, event="log", data=data))

flare.init()
site = flare.get_site_name()
raw(key="config", value={"lr": 0.1, "optimizer": "sgd"}, step=None, kind="params", writer="mlflow")
while flare.is_running():
    model = flare.receive()
    r = model.current_round
    flare.log("train_loss", 1.0 / (r + 1), r)
    raw(key="losses", value={"a": float(r), "b": 2.0 * r}, step=r, kind="scalars", writer="tensorboard")
    raw(key="val_acc", value=ACCURACY[r], step=r, kind="metric", writer="mlflow")
    raw(key="bad", value=[1.0, 2.0], step=r, kind="scalar", writer="tensorboard")
    raw(key="k" * 300, value=1.0, step=r, kind="scalar", writer="wandb")
    params = {k: v + 1 for k, v in model.params.items()}
    flare.send(flare.FLModel(params=params, metrics={"accuracy": ACCURACY[r]}, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""


def write_job(folder: Path, tracking: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "client.py").write_text(SCRIPT % (ACCURACY,))
    serde.write_file(folder / "model.safetensors", serde.layout({"w": torch.zeros(4)}))
    (folder / "job.toml").write_text(
        f'name = "tracked"\nmodel = "model.safetensors"\n\n[strategy]\nname = "fedavg"\nmin_clients = 2\n'
        f'num_rounds = {len(ACCURACY)}\n\n[script]\npath = "client.py"\n\n[sites]\nmin = 2\nmax = 2\n{tracking}'
    )
    return folder


async def _run_job(tmp: Path, tracking: str) -> dict[str, Any]:
    async with federation(tmp, sites=2) as (broker, _sites, admin):
        job_id = await admin.submit(write_job(tmp / "job", tracking))
        job = await wait_job(admin, job_id)
        assert job["state"] == "finished", job
        folder = broker.store.job_dir(job_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while "key_metric" in tracking and not (folder / BEST_MODEL).exists() and loop.time() < deadline:
            await asyncio.sleep(0.05)  # the job's tracking thread writes it just after the version is published
        download = await admin.download(job_id, tmp / "download")
        events = broker.store.events(job_id, "log")
    # the broker has shut down here: every tracking store is closed and flushed
    return {"job_id": job_id, "folder": folder, "download": download, "events": events}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    types = [kind for kind, present in HAS.items() if present]
    tmp = tmp_path_factory.mktemp("tracked")
    return asyncio.run(_run_job(tmp, f'\n[tracking]\ntypes = {types!r}\nkey_metric = "accuracy"\n'.replace("'", '"')))


@pytest.mark.skipif(not HAS["tensorboard"], reason="tensorboard is not installed (pip install fedbus[tensorboard])")
def test_sites_records_in_tensorboard_event_files(tracked: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked["folder"] / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for site in ("site-1", "site-2"):
        loss = [(e.step, e.value) for e in acc.Scalars(f"{site}/train_loss")]
        assert loss == [(r, pytest.approx(1.0 / (r + 1))) for r in range(len(ACCURACY))]
        losses_b = [(e.step, e.value) for e in acc.Scalars(f"{site}/losses/b")]
        assert losses_b == [(r, 2.0 * r) for r in range(len(ACCURACY))]
        assert [e.value for e in acc.Scalars(f"{site}/val_acc")] == pytest.approx(ACCURACY)
        assert f"{site}/bad" not in tags  # refused: a scalar must be a number
    assert "accuracy" in tags  # the broker's own curve of each version's metrics, in the same files


@pytest.mark.skipif(not HAS["mlflow"], reason="mlflow is not installed (pip install fedbus[mlflow])")
def test_sites_records_in_the_mlflow_file_store(tracked: dict[str, Any]) -> None:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracked["folder"] / "mlruns").as_uri())
    exp = client.get_experiment_by_name("tracked")
    assert exp is not None
    runs = {r.data.tags["fedbus.site"]: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["site-1", "site-2"]  # one run per site, as FLARE's MLflowReceiver keeps them
    for site, run in runs.items():
        assert run.info.run_name == f"{site}-{tracked['job_id']}"
        assert run.info.status == "FINISHED"
        assert run.data.params == {"lr": "0.1", "optimizer": "sgd"}
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert sorted((m.step, m.value) for m in history) == [(r, pytest.approx(a)) for r, a in enumerate(ACCURACY)]
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == len(ACCURACY)
        assert "bad" not in run.data.metrics


@pytest.mark.skipif(not HAS["wandb"], reason="wandb is not installed (pip install fedbus[wandb])")
def test_sites_records_in_wandb_offline_runs(tracked: dict[str, Any]) -> None:
    runs = sorted((tracked["folder"] / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2  # one offline run per site
    seen: dict[str, dict[str, list[float]]] = {}
    for path in runs:
        name, values = "", {}
        for rec in wandb_records(path):
            if rec.WhichOneof("record_type") == "run":
                name = rec.run.display_name
            elif rec.WhichOneof("record_type") == "history":
                for item in rec.history.item:
                    values.setdefault(item.key or "/".join(item.nested_key), []).append(float(item.value_json))
        seen[name.removesuffix(f"-{tracked['job_id']}")] = values
    assert sorted(seen) == ["site-1", "site-2"]
    for values in seen.values():
        assert values["val_acc"] == pytest.approx(ACCURACY)
        assert values["train_loss"] == pytest.approx([1.0 / (r + 1) for r in range(len(ACCURACY))])
        assert "bad" not in values


def wandb_records(path: Path) -> list[Any]:
    """The records of a ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose records have
    a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and hold protobuf ``Record``s."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, part, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # the block's padding
            pos += left
            continue
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(part)
            out.append(rec)
            part = b""
    return out


def test_best_model_by_key_metric(tracked: dict[str, Any]) -> None:
    download = tracked["download"]
    assert download["best_version"] == 2 and download["best_metric"] == pytest.approx(0.9)
    with safe_open(str(tracked["folder"] / BEST_MODEL), "pt") as f:
        assert f.metadata()["version"] == "2" and f.metadata()["key_metric"] == "accuracy"
    # the tracking thread's copy, or (before it landed) version 2's own checkpoint: the same model either way
    assert download["best_model_path"] in (
        str(tracked["folder"] / BEST_MODEL),
        str(tracked["folder"] / "models/v2.safetensors"),
    )
    best = serde.read_file(download["best_model_path"])
    assert torch.equal(best["w"], torch.full((4,), 2.0))  # each round adds 1: version 2 holds 2s


def test_log_events_stay_in_the_store_and_bad_ones_are_refused(tracked: dict[str, Any]) -> None:
    keys = [e["data"]["key"] for e in tracked["events"]]
    assert keys.count("train_loss") == 2 * len(ACCURACY)  # fedbus status still shows what flare.log sent
    assert keys.count("val_acc") == 2 * len(ACCURACY)
    assert "bad" not in keys and not any(len(k) > 256 for k in keys)


def test_without_tracking_no_tracking_files(tmp_path: Path) -> None:
    out = asyncio.run(_run_job(tmp_path, ""))
    folder = out["folder"]
    assert not (folder / "mlruns").exists() and not (folder / "wandb").exists()
    assert not (folder / BEST_MODEL).exists() and "best_version" not in out["download"]
    assert [e["data"]["key"] for e in out["events"]].count("train_loss") == 2 * len(ACCURACY)
    if HAS["tensorboard"]:  # the broker's own curves only
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(folder / "tensorboard"))
        acc.Reload()
        assert not any(t.startswith("site-") for t in acc.Tags()["scalars"])


# --- the checks, without IO ---------------------------------------------------------------------------------


def test_check_record_takes_both_shapes() -> None:
    assert check_record({"key": "loss", "value": 0.5, "step": 3}).kind == "scalar"
    assert check_record({"key": "loss", "value": 2, "step": None}).value == 2
    rec = check_record({"key": "m", "value": {"a": 1.0}, "step": 1, "kind": "metrics", "writer": "mlflow"})
    assert (rec.kind, rec.writer) == ("metrics", "mlflow")
    assert check_record({"key": "note", "value": "hello", "step": 0}).kind == "text"
    assert check_record({"key": "p", "value": {"opt": "sgd", "nesterov": True}, "kind": "params"}).kind == "params"


@pytest.mark.parametrize(
    "data",
    [
        {"key": "", "value": 1.0},
        {"key": "x" * 257, "value": 1.0},
        {"key": 3, "value": 1.0},
        {"key": "loss", "value": math.inf},
        {"key": "loss", "value": True},
        {"key": "loss", "value": [1.0, 2.0]},
        {"key": "loss", "value": 1.0, "step": -1},
        {"key": "loss", "value": 1.0, "step": 1.5},
        {"key": "loss", "value": 1.0, "kind": "image"},
        {"key": "loss", "value": 1.0, "writer": "comet"},
        {"key": "s", "value": {"a": float("nan")}, "kind": "scalars"},
        {"key": "s", "value": {}, "kind": "scalars"},
        {"key": "s", "value": {str(i): 1.0 for i in range(300)}, "kind": "scalars"},
        {"key": "t", "value": "x" * 70_000, "kind": "text"},
    ],
)
def test_check_record_refuses(data: dict[str, Any]) -> None:
    with pytest.raises(FedbusError, match="log record"):
        check_record(data)


def test_best_version_is_the_one_each_metric_rates() -> None:
    history = [
        {"version": 0, "metrics": {}},
        {"version": 1, "metrics": {"acc": 0.99}},  # rates version 0, the initial model: never chosen
        {"version": 2, "metrics": {"acc": 0.5}},  # rates version 1
        {"version": 3, "metrics": {"acc": float("nan")}},
        {"version": 4, "metrics": {"acc": 0.8}},  # rates version 3
        {"version": 5, "metrics": {"acc": 0.8}},
        {"version": 6, "metrics": {}},
    ]
    assert best_version(history, "acc") == (3, 0.8)
    assert best_version(history, "loss") is None
    assert best_version(history[:2], "acc") is None


def test_a_full_queue_drops_and_counts_and_the_rest_lands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking, "QUEUE_MAX", 3)
    sink = tracking.JobSink("job-1", tmp_path, {"name": "j"}, None)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:  # keeps the sink's thread busy while the queue fills
        held.set()
        release.wait(10)

    try:
        assert sink.put("end", hold) and held.wait(10)
        for i in range(5):
            assert sink.put("lines", ("site-1", [f"line {i}"], 0))
        assert sink.dropped == 2
    finally:
        release.set()
        sink.put("stop", None)
        sink.thread.join(10)
    assert (tmp_path / "logs" / "site-1.log").read_text().splitlines() == ["line 0", "line 1", "line 2"]
    assert not sink.put("lines", ("site-1", ["late"], 0))  # its thread ended: the broker starts a new sink
