"""Observability: the broker's Prometheus endpoint, scraped over real HTTP while a real job runs (in-process
federation, real child-process scripts), the endpoint's handling of bad requests, TensorBoard event files,
and the daemons' JSON log lines carrying job, site and round."""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedbus import log
from fedbus.broker import Broker
from fedbus.broker.metrics import MAX_REQUEST, Metrics, MetricsServer, reason_class, render, tensorboard_available
from fedbus.broker.registry import Registry
from fedbus.broker.store import JobStore
from fedbus.config import BrokerConfig
from fedbus.errors import TransportError
from tests.broker.harness import federation, wait_job, write_job

pytestmark = pytest.mark.timeout(90)

# Each task takes 0.15 s; site-3 always sends NaN, which the strategy refuses.
SCRIPT = """
import time
import fedbus.client as flare

flare.init()
bad = flare.get_site_name() == "site-3"
while flare.is_running():
    model = flare.receive()
    time.sleep(0.15)
    params = {k: v + 1 for k, v in model.params.items()}
    if bad:
        params["w"][0] = float("nan")
    flare.send(flare.FLModel(params=params, metrics={"loss": 1.0}, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""
FEDBUFF = 'name = "fedbuff"\nconcurrency = 3\nbuffer_size = 2\nnum_versions = 8\n'
SAMPLE = re.compile(r"^([a-z_]+)(\{[^}]*\})? (\S+)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def http(port: int, raw: bytes) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def scrape(port: int) -> dict[str, float]:
    """``name{labels}`` -> value, every sample line checked against the text format."""
    status, body = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    out = {}
    family, kind, seen = "", "", set()
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ")
            assert family not in seen, f"family {family} declared twice"
            seen.add(family)
            continue
        if line.startswith("#"):
            assert re.match(r"^# HELP [a-z_]+ ", line), line
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        assert any(m[1] == family + s for s in suffixes), f"{m[1]} outside its family (under {family})"
        out[m[1] + (m[2] or "")] = float(m[3])
    return out


def total(samples: dict[str, float], prefix: str, *parts: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(prefix) and all(p in k for p in parts))


async def run_and_scrape(tmp: Path, port: int, job: Path) -> tuple[str, dict, list[dict], dict]:
    """Run ``job``, scraping before, every 50 ms while it runs, and after: (job id, idle, during, end)."""
    async with federation(tmp, metrics_port=port) as (_broker, _sites, admin):
        for _ in range(100):  # the sites' hellos may still be on their way
            idle = await scrape(port)
            if idle["fedbus_sites_connected"] == 3:
                break
            await asyncio.sleep(0.05)
        job_id = await admin.submit(job)
        during: list[dict[str, float]] = []
        for _ in range(400):  # bounded: 20 s
            samples = await scrape(port)
            if samples['fedbus_jobs{state="running"}'] == 1:
                during.append(samples)
            elif during:
                break
            await asyncio.sleep(0.05)
        await wait_job(admin, job_id, timeout=60)
        return job_id, idle, during, await scrape(port)


async def test_counters_move_while_a_job_runs(tmp_path: Path) -> None:
    port = free_port()
    job = write_job(tmp_path / "job", strategy=FEDBUFF)
    (job / "client.py").write_text(SCRIPT)
    stream = io.StringIO()
    log.configure(json=True, level="info", stream=stream)  # the daemons' log lines, checked at the end
    try:
        job_id, idle, during, end = await run_and_scrape(tmp_path, port, job)
    finally:
        log.configure(level="warning")

    assert idle["fedbus_sites_connected"] == 3
    assert idle['fedbus_jobs{state="running"}'] == 0
    assert len(during) >= 2, "the job ended before two scrapes saw it running"
    first, last = during[0], during[-1]
    published = f'fedbus_versions_published_total{{job="{job_id}"}}'
    assert last.get(published, 0) > first.get(published, 0), "versions did not move during the job"
    assert total(last, "fedbus_payload_bytes_total", '"out"') > total(first, "fedbus_payload_bytes_total", '"out"')
    assert f'fedbus_job_version{{job="{job_id}"}}' in last
    assert end[published] == 8
    assert end['fedbus_jobs{state="finished"}'] == 1 and end['fedbus_jobs{state="running"}'] == 0
    accepted = end[f'fedbus_updates_total{{job="{job_id}",outcome="accepted",reason=""}}']
    assert accepted >= 16  # 8 versions x buffer_size 2
    assert end[f'fedbus_updates_total{{job="{job_id}",outcome="refused",reason="non_finite"}}'] >= 1
    assert end[f'fedbus_update_staleness_count{{job="{job_id}"}}'] == accepted
    assert end[f'fedbus_update_staleness_bucket{{job="{job_id}",le="+Inf"}}'] == accepted
    # every site got the model and sent updates: streams both ways, with a throughput
    assert end['fedbus_streams_total{direction="out",outcome="ok"}'] >= 16
    assert end['fedbus_streams_total{direction="in",outcome="ok"}'] >= 17  # the upload + the updates
    assert end['fedbus_stream_throughput_bytes_per_second{direction="in"}'] > 0
    assert end['fedbus_payload_bytes_total{direction="in"}'] > idle['fedbus_payload_bytes_total{direction="in"}']
    assert end['fedbus_messages_total{direction="in",type="result"}'] >= accepted
    check_log_context(stream.getvalue(), job_id)


def check_log_context(text: str, job_id: str) -> None:
    """Every line is one JSON object; task-level lines carry job, site and round (the task's version)."""
    lines = [json.loads(line) for line in text.splitlines()]
    events: dict[str, list[dict]] = {}
    for rec in lines:
        assert {"event", "level", "timestamp", "component"} <= rec.keys(), rec
        events.setdefault(rec["event"], []).append(rec)
    for event in ("task handed to the script", "result delivered"):  # the sites
        recs = events[event]
        assert {r["site"] for r in recs} == {"site-1", "site-2", "site-3"}
        assert all(r["job"] == job_id and isinstance(r["round"], int) for r in recs), recs
    published = events["new global version"]  # the broker
    assert [(r["job"], r["round"]) for r in published] == [(job_id, v) for v in range(1, 9)]
    assert all(r["job"] == job_id for r in lines if "task_id" in r)


@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard is not installed")
async def test_tensorboard_event_files_per_job(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    async with federation(tmp_path) as (broker, _sites, admin):
        job_id = await admin.submit(write_job(tmp_path / "job", rounds=2))
        job = await wait_job(admin, job_id)
        board = broker.store.job_dir(job_id) / "tensorboard"
        assert broker.metrics.boards is not None and not broker.metrics.boards._writers  # closed at the job's end
    assert job["state"] == "finished", job["reason"]
    acc = EventAccumulator(str(board))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "loss" in tags and "fedbus/staleness" in tags and "fedbus/staleness_max" in tags
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    assert [(e.step, e.value) for e in acc.Scalars("fedbus/staleness")] == [(1, 0.0), (2, 0.0)]  # FedAvg: never stale


@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard is not installed")
def test_tensorboard_is_imported_off_the_event_loop_at_start() -> None:
    # Importing it where the first version is published held the broker's loop for ~1 s. A fresh process,
    # since this one may have imported it already.
    probe = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from fedbus.broker.metrics import BoardWriters\n"
        "assert 'torch.utils.tensorboard' not in sys.modules\n"
        "BoardWriters(lambda job: Path(job))\n"
        "deadline = time.monotonic() + 30\n"
        "while 'torch.utils.tensorboard' not in sys.modules and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
        "print('torch.utils.tensorboard' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


async def test_bad_requests_are_refused_and_the_server_keeps_serving() -> None:
    server = MetricsServer(lambda: "fedbus_up_seconds 1\n", "127.0.0.1", 0)
    await server.start()
    try:
        assert (await http(server.port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0] == 405
        assert (await http(server.port, b"GET /secret HTTP/1.1\r\n\r\n"))[0] == 404
        assert (await http(server.port, b"hello\r\n\r\n"))[0] == 400
        assert (await http(server.port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_REQUEST + b"\r\n\r\n"))[0] == 431
        assert await http(server.port, b"GET /healthz HTTP/1.1\r\n\r\n") == (200, "ok\n")
        assert await http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n") == (200, "fedbus_up_seconds 1\n")
    finally:
        await server.close()


def test_refusal_reasons_map_to_few_labels() -> None:
    assert reason_class("non-finite values (NaN/Inf) in 'w'") == "non_finite"
    assert reason_class("stale: s=5 > max_staleness=4") == "stale"
    assert reason_class("shape mismatch for 'w': expected (10,), got (11,)") == "shape_or_dtype"
    assert reason_class("upload failed: stream 3 from b'x': stalled") == "upload_failed"
    assert reason_class("script crashed: exited with code 3") == "script_crashed"
    assert reason_class("something new") == "other"


async def test_a_metrics_port_in_use_is_a_clear_startup_error(tmp_path: Path) -> None:
    opts = {"bind": f"ipc://{tmp_path}/b.sock", "workspace": str(tmp_path / "ws")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(TransportError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            async with Broker(BrokerConfig(**opts, metrics_port=port)):
                pass
    async with Broker(BrokerConfig(**opts)) as broker:  # what the failed start opened was closed again
        assert broker.address == opts["bind"]


def test_counters_render_exactly(tmp_path: Path) -> None:
    """Big counters keep every digit (a rate over a rounded counter would jump), floats round-trip."""
    broker = SimpleNamespace(registry=Registry(1.0, 5), store=JobStore(tmp_path), controllers={})
    metrics = Metrics()
    metrics.bytes["in"] = 123_456_789_012_345
    metrics.stream_done("in", 10_000_000_001, 0.1, ok=True)
    try:
        text = render(metrics, broker)
    finally:
        broker.store.close()
    assert 'fedbus_payload_bytes_total{direction="in"} 123456789012345\n' in text
    assert 'fedbus_stream_bytes_total{direction="in"} 10000000001\n' in text
    assert 'fedbus_stream_seconds_total{direction="in"} 0.1\n' in text
    assert 'fedbus_stream_throughput_bytes_per_second{direction="in"} 100000000010.0\n' in text
