"""When a peer owes a heartbeat: any message counts as a sign of life (Majordomo's rule), so a heartbeat is
due only once a whole period has passed without a message in one direction or the other.

Both directions matter. A site that has just sent something has no news to give, but if the broker has said
nothing in that time, a heartbeat is how the site asks it for an answer; one whose messages go both ways
stays quiet. Where it saves most is a busy site (a long upload sends only chunks). On the scale bench, where
1,000 sites exchange a task and a result in bursts 2-3 s apart, it saves little: 0.9 heartbeats per site per
second against 1.0 (docs/benchmarks.md).
"""

from __future__ import annotations

CLOCK_SLACK_S = 0.005
"""asyncio may run a timer up to its clock resolution early: a heartbeat that much early is on time."""


def heartbeat_due_in(sent_at: float, heard_at: float, period: float, now: float) -> float:
    """Seconds until a heartbeat is due (<= 0: send one now), from the clock times of the last message sent
    and the last one received."""
    return min(sent_at, heard_at) + period - CLOCK_SLACK_S - now
