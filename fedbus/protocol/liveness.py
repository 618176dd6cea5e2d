"""When a peer owes a heartbeat: any message counts as a sign of life (Majordomo's rule), so a heartbeat is
due only once a whole period has passed without a message in one direction or the other.

Both directions matter. A site that has just sent something has no news to give, but if the broker has said
nothing in that time, a heartbeat is how the site asks it for an answer; one whose messages go both ways
stays quiet. It is for busy peers: a site streaming a large upload sends chunks, and its heartbeats would queue
behind them in the same socket anyway, so the broker counts the chunks. On the scale bench, where 1,000 sites
exchange a task and a result in bursts 2-3 s apart, it saves nothing measurable: 0.90-1.09 heartbeats per site
per second in 5 s windows, against 1.0 before (docs/benchmarks.md).
"""

from __future__ import annotations

CLOCK_SLACK_S = 0.005
"""asyncio may run a timer up to its clock resolution early: a heartbeat that much early is on time."""


def heartbeat_due_in(sent_at: float, heard_at: float, period: float, now: float) -> float:
    """Seconds until a heartbeat is due (<= 0: send one now), from the clock times of the last message sent
    and the last one received."""
    return min(sent_at, heard_at) + period - CLOCK_SLACK_S - now
