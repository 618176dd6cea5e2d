"""The bench commands run end to end at a tiny size and report every figure they promise (not speed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedbus.bench.round import run_round
from fedbus.bench.scale import run_scale

pytestmark = pytest.mark.timeout(300)


def _last_json(report: str) -> dict:
    return json.loads(report.splitlines()[-1])


def test_bench_round_reports_its_figures() -> None:
    out = _last_json(run_round(0.5, 2, rounds=2, strategy="fedbuff"))
    assert out["strategy"] == "fedbuff" and out["accepted"] == 4
    _check_figures(out, 524288)


def _check_figures(out: dict, size: int) -> None:
    """Every figure of a two-site round run, each consistent with the others."""
    assert out["bytes_per_round"] == 2 * 2 * size
    assert out["round_s"] > 0 and out["gbps"] > 0 and out["raw_zmq_gbps"] > 0
    # gbps is rounded to 3 decimals: on a loaded machine (0.02 GB/s) that alone moves the quotient by 2.5 %
    assert out["efficiency"] == pytest.approx(out["gbps"] / out["raw_zmq_gbps"], rel=0.02, abs=0.002)
    assert out["processes"] == 5  # broker, 2 sites, 2 scripts, each over its own baseline: the tree holds the broker
    assert out["broker_rss_x"] > 0 and out["total_rss_x"] >= out["broker_rss_x"]
    assert set(out["cpu_s_per_round"]) == {"broker", "sites", "scripts"}
    cores = os.cpu_count() or 1  # OpenMP: the sites split the cores, the broker (a server) has half of them
    assert out["omp_threads"] == {"broker": max(1, cores // 3, cores // 2), "sites": max(1, cores // 3)}
    threads = out["broker_cpu_s_per_round"]  # the broker's CPU by thread: its event loop, zmq's I/O, workers
    assert set(threads) == {"main", "zmq_io", "other"} and min(threads.values()) >= 0
    assert sum(threads.values()) == pytest.approx(out["cpu_s_per_round"]["broker"], abs=0.05)  # the same CPU, split
    per_gib = out["cpu_s_per_gib"]  # the same CPU over the GiB moved, each kind split by thread, and raw ZeroMQ's
    assert set(out["cpu_s_per_round_threads"]) == set(per_gib["threads"]) == {"broker", "sites", "scripts"}
    # one measured round of a 0.5 MiB model may cost less than the CPU clock's 10 ms tick: total may read 0
    assert per_gib["total"] >= 0 and per_gib["raw_zmq"] > 0 and out["layout"] == "blocks"
    assert per_gib["total"] == pytest.approx(sum(per_gib[k] for k in ("broker", "sites", "scripts")), abs=0.01)


def test_bench_round_over_curve_keeps_a_timeline_and_takes_a_broker_profile(tmp_path: Path) -> None:
    profile = tmp_path / "broker.toml"
    profile.write_text("heartbeat_s = 0.7\nchunk_mb = 1\n")  # 1 MiB chunks: a 3 MiB update is spooled
    out = _last_json(run_round(3, 2, rounds=2, logs=tmp_path / "logs", broker_config=profile, curve=True))
    assert out["accepted"] == 4 and out["curve"] and out["strategy"] == "fedavg"
    _check_figures(out, 3 << 20)
    events = {}
    for name in ("broker", "s0", "s1"):
        for line in (tmp_path / "logs" / f"{name}.log").read_text().splitlines():
            record = json.loads(line)
            events.setdefault((name, record["event"]), []).append(record)
    assert [e["heartbeat_s"] for e in events[("s0", "welcomed by the broker")]] == [0.7]  # the profile's
    assert [e["curve"] for e in events[("broker", "broker listening")]] == [True]  # the kit's keys, merged
    for event in ("model sent", "update received", "update decided"):
        assert sorted(e["site"] for e in events[("broker", event)]) == ["s0", "s0", "s1", "s1"], event
        assert all(e["seconds"] >= 0 for e in events[("broker", event)])


def test_bench_scale_reports_its_figures() -> None:
    out = _last_json(run_scale(6, size_kb=20, seconds=3, procs=1, buffer=2, heartbeat_s=0.2, sim_nice=3))
    assert out["sim_nice"] == min(3, 19 - os.getpriority(os.PRIO_PROCESS, 0))  # as the simulators saw it
    assert out["versions"] >= 2 and out["updates_per_s"] > 0 and out["accepted"] >= 2 * out["versions"] - 2
    assert out["heartbeats"] > 0 and 0 < out["hb_p50_ms"] <= out["hb_p99_ms"]
    assert out["broker_cpu"] > 0 and out["broker_rss_mb"] > 0
