"""The round bench's memory figures: each process's peak over its own baseline, never a negative growth."""

from __future__ import annotations

import pytest

from fedbus.bench.round import memory_growth

MiB = 1 << 20

# RSS (MiB) of a fedbuff run at 0.5 MiB x 2 sites whose ``total_rss_x`` came out at -16.0: the two scripts' peaks
# sat below the RSS of an idle script process measured beside them (230 MiB), which the bench subtracted once per
# script (236 + 2 x 228 + 218 + 222 - 228 - 2 x 226 - 2 x 230 = -8 MiB); each script's own RSS once connected
# (its baseline) is below its peak.
PEAK = {1: 236, 2: 228, 3: 228, 4: 218, 5: 222}  # broker, two sites, two scripts
BASE = {1: 228, 2: 226, 3: 226, 4: 216, 5: 219}
IDLE_SCRIPT_ELSEWHERE = 230


def _bytes(mib: dict[int, int]) -> dict[int, int]:
    return {pid: v * MiB for pid, v in mib.items()}


def test_the_tree_grows_by_each_process_over_its_own_baseline() -> None:
    growth = memory_growth(_bytes(PEAK), _bytes(BASE))
    assert growth == {1: 8 * MiB, 2: 2 * MiB, 3: 2 * MiB, 4: 2 * MiB, 5: 3 * MiB}
    assert sum(growth.values()) / (MiB // 2) == 34.0  # total_rss_x at 0.5 MiB, above broker_rss_x (16.0)


def test_a_process_without_its_own_baseline_gives_no_figure() -> None:
    base = _bytes(BASE)
    del base[5]
    with pytest.raises(RuntimeError, match=r"\[5\]"):
        memory_growth(_bytes(PEAK), base)


def test_a_peak_below_its_baseline_gives_no_figure() -> None:
    base = _bytes(BASE) | {4: IDLE_SCRIPT_ELSEWHERE * MiB}  # a peak read before the baseline was taken
    with pytest.raises(RuntimeError, match="below its baseline"):
        memory_growth(_bytes(PEAK), base)
