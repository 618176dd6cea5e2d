"""The heartbeat rule: one is due only after a whole period without a message in either direction."""

from __future__ import annotations

import math

from fedbus.protocol.liveness import CLOCK_SLACK_S, heartbeat_due_in


def test_traffic_both_ways_postpones_the_heartbeat() -> None:
    assert math.isclose(heartbeat_due_in(sent_at=10.0, heard_at=10.2, period=1.0, now=10.5), 0.5 - CLOCK_SLACK_S)


def test_the_older_direction_decides() -> None:
    # sent just now, but nothing heard for a period: the broker must be asked for an answer now
    assert heartbeat_due_in(sent_at=10.9, heard_at=9.9, period=1.0, now=10.9) <= 0
    assert heartbeat_due_in(sent_at=9.9, heard_at=10.9, period=1.0, now=10.9) <= 0


def test_a_timer_that_fires_slightly_early_still_sends() -> None:
    assert heartbeat_due_in(sent_at=10.0, heard_at=10.0, period=1.0, now=11.0 - CLOCK_SLACK_S / 2) <= 0
    assert heartbeat_due_in(sent_at=10.0, heard_at=10.0, period=1.0, now=10.9) > 0


def test_nothing_ever_sent_is_due_at_once() -> None:
    assert heartbeat_due_in(float("-inf"), float("-inf"), 1.0, 0.0) < 0
