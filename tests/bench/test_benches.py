"""The bench commands run end to end at a tiny size and report every figure they promise (not speed)."""

from __future__ import annotations

import json

import pytest

from fedbus.bench.round import run_round
from fedbus.bench.scale import run_scale

pytestmark = pytest.mark.timeout(300)


def _last_json(report: str) -> dict:
    return json.loads(report.splitlines()[-1])


@pytest.mark.parametrize("strategy", ["fedavg", "fedbuff"])
def test_bench_round_reports_its_figures(strategy: str) -> None:
    out = _last_json(run_round(0.5, 2, rounds=2, strategy=strategy))
    assert out["strategy"] == strategy and out["accepted"] == 4
    assert out["bytes_per_round"] == 2 * 2 * 524288
    assert out["round_s"] > 0 and out["gbps"] > 0 and out["raw_zmq_gbps"] > 0
    assert out["efficiency"] == pytest.approx(out["gbps"] / out["raw_zmq_gbps"], rel=0.02)
    assert out["broker_rss_x"] > 0 and out["total_rss_x"] > 0 and out["processes"] == 5  # broker, 2 sites, 2 scripts
    assert set(out["cpu_s_per_round"]) == {"broker", "sites", "scripts"}


def test_bench_scale_reports_its_figures() -> None:
    out = _last_json(run_scale(6, size_kb=20, seconds=3, procs=1, buffer=2, heartbeat_s=0.2))
    assert out["versions"] >= 2 and out["updates_per_s"] > 0 and out["accepted"] >= 2 * out["versions"] - 2
    assert out["heartbeats"] > 0 and 0 < out["hb_p50_ms"] <= out["hb_p99_ms"]
    assert out["broker_cpu"] > 0 and out["broker_rss_mb"] > 0
