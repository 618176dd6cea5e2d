"""``fedbus bench transfer`` end to end on a small model: the report's shape and sane figures, not speed."""

from __future__ import annotations

import json

import pytest
import torch

from fedbus.bench.transfer import run_transfer
from fedbus.errors import ConfigError

pytestmark = pytest.mark.timeout(120)


def _figures(report: str) -> dict:
    return json.loads(report.strip().splitlines()[-1])


def test_transfer_bench_reports_every_figure() -> None:
    got = _figures(run_transfer(8, chunk_mb=1, window_mb=4, repeat=2))
    keys = ("fedbus_gbps", "raw_zmq_gbps", "raw_zmq_spread_gbps", "memcpy_gbps", "ratio", "fedbus_warm_gbps")
    for key in (*keys, "warm_ratio", "ratio_vs_spread"):
        assert got[key] > 0, key
    assert got["ratio"] == pytest.approx(got["fedbus_gbps"] / got["raw_zmq_gbps"], rel=0.02)
    # two runs, each with its own ratio; the report is the median one's (of two, the lower)
    assert got["repeat"] == 2 and len(got["ratios"]) == 2
    assert got["ratio"] == pytest.approx(min(got["ratios"]), abs=0.002)
    assert got["ratio_vs_spread"] == pytest.approx(got["fedbus_gbps"] / got["raw_zmq_spread_gbps"], rel=0.02)
    assert set(got["receiver_cpu_s"]) == {"main", "zmq_io", "other"} and got["receiver_cpu_s"]["main"] > 0
    # Growth over the baseline, in model sizes: at 8 MiB malloc may reuse resident memory, so only bounds.
    assert 0 <= got["sender_rss_x"] < 3 and 0 <= got["receiver_rss_x"] < 3
    assert got["tensors"] > 1 and got["device"] == "cpu"
    assert ("raw_zmq_lanes_gbps" in got) == (got["lanes"] > 1)  # the lanes' ceiling where there are lanes


def test_transfer_bench_over_lanes_reports_their_raw_ceiling_too() -> None:
    got = _figures(run_transfer(8, chunk_mb=1, window_mb=4, repeat=1, lanes=2))
    assert got["lanes"] == 2 and got["raw_zmq_lanes_gbps"] > 0 and got["fedbus_gbps"] > 0
    assert got["ratio_vs_lanes"] == pytest.approx(got["fedbus_gbps"] / got["raw_zmq_lanes_gbps"], rel=0.02)
    assert 0 <= got["receiver_rss_x"] < 3


def test_transfer_bench_refuses_a_device_it_cannot_use() -> None:
    with pytest.raises(ConfigError, match="--device 'meta'"):
        run_transfer(1, device="meta")
    with pytest.raises(ConfigError, match="--repeat must be >= 1"):
        run_transfer(1, repeat=0)
    with pytest.raises(ConfigError, match="--lanes must be in"):
        run_transfer(1, lanes=9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_transfer_bench_from_a_gpu_counts_the_device_copy() -> None:
    got = _figures(run_transfer(64, device="cuda", dtype="bfloat16"))
    assert 0 < got["d2h_s"] < got["fedbus_s"] and got["dtype"] == "bfloat16"
    assert got["sender_rss_x"] < 1.5  # the hand-over file's pages, not a second host copy of the model
