"""CPU seconds per GiB moved: the arithmetic, and raw ZeroMQ's own CPU measured on both sides of a real transfer."""

from __future__ import annotations

import pytest

from fedbus.bench.common import GiB, MiB, per_gib, process_cpu_s
from fedbus.bench.round import RAW_CAP, _cpu_per_gib
from fedbus.bench.transfer import RawRun, raw_zmq_run

pytestmark = pytest.mark.timeout(60)


def test_per_gib_divides_every_figure_nested_too() -> None:
    got = per_gib({"total": 3.0, "broker": 1.0, "threads": {"broker": {"main": 0.5, "zmq_io": 0.25}}}, 2 * GiB)
    assert got == {"total": 1.5, "broker": 0.5, "threads": {"broker": {"main": 0.25, "zmq_io": 0.125}}}


def test_a_round_reports_each_kind_and_thread_per_gib_beside_raw_zmq() -> None:
    kinds = {"broker": 2.0, "sites": 3.0, "scripts": 1.0}
    threads = {"broker": {"main": 1.0, "other": 0.5, "zmq_io": 0.5}}
    got = _cpu_per_gib(kinds, threads, 4 * GiB, RawRun(gbps=1.0, send_cpu_s=0.5, recv_cpu_s=0.5))
    assert got["total"] == 1.5 and got["broker"] == 0.5 and got["sites"] == 0.75 and got["scripts"] == 0.25
    assert got["threads"]["broker"] == {"main": 0.25, "other": 0.125, "zmq_io": 0.125}
    assert got["raw_zmq"] == 0.25  # 1 s of raw CPU for 4 GiB
    # raw ZeroMQ moves at most RAW_CAP bytes: its CPU is per the bytes it moved, not the round's
    big = _cpu_per_gib(kinds, threads, 2 * RAW_CAP, RawRun(gbps=1.0, send_cpu_s=1.0, recv_cpu_s=1.0))
    assert big["raw_zmq"] == round(2.0 / (RAW_CAP / GiB), 3)


def test_process_cpu_counts_threads_that_ended() -> None:
    import threading

    before = process_cpu_s()

    def spin() -> None:
        x = 0
        for i in range(2_000_000):
            x += i

    t = threading.Thread(target=spin)
    t.start()
    t.join()
    assert process_cpu_s() > before


def test_raw_zmq_reports_each_sides_cpu() -> None:
    run = raw_zmq_run(16 * MiB, 8 * MiB)
    assert run.gbps > 0 and run.send_cpu_s > 0 and run.recv_cpu_s > 0
