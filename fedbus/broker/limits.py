"""Per-peer limits at the broker: a budget of messages and bytes per second, streams in flight, refusal bursts.

Why: every peer shares one broker loop. A peer that floods it with messages or bytes, or opens offer after
offer, must be refused on its own while every other peer is served as before. Every message a peer sends
counts, whatever becomes of it (answered, refused, unauthorized, undecodable), and it is counted before any
work is done for it: only its envelope (a few hundred bytes, capped) has been decoded, to know its type.

What is not counted: the traffic of a model stream the peer really has open (chunks, credits, acks of a
stream the broker's hub holds). Credit already bounds it (the receiver's window paces the sender), and a
10 GiB upload is thousands of chunks at wire speed: no rate limit must slow it. The same types for a stream
that does not exist (a made-up id, or before hello) are metered like anything else. An offer opens a
stream: metered, its inline bytes (a small model) too.

A message larger than the byte burst is let through when the bucket is full, leaving it in debt: no message
is refused for its size alone (size caps are the envelope's and the transport's), it only waits longer.

Refusals come in bursts (a flooder's): ``Refusals`` keeps one record per burst of one peer and kind, so that the
caller logs and audits the first refusal of a burst and, when the burst ends (quiet for ``gap`` seconds) or has
gone on ``report_every`` seconds, writes one record with the count since; it answers the first, and then one
a second.

Memory is bounded too: a peer identity is whatever a peer says it is, so buckets of peers that have been
quiet long enough to be full again are forgotten once more than ``max_peers`` are known.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace

from fedbus.protocol.messages import STREAM_TYPES

UNMETERED = STREAM_TYPES - {"offer"}
"""Message types the budget leaves alone when they belong to a stream the peer has open (credit bounds them).
An offer opens a stream: always metered."""


@dataclass
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``take`` spends one if there is one."""

    rate: float
    burst: float
    tokens: float
    last: float

    def take(self, now: float, n: float = 1.0) -> bool:
        """Spend ``n`` tokens if there are (all of ``burst`` does for an ``n`` above it: the rest is debt)."""
        self.refill(now)
        if self.tokens >= min(n, self.burst):
            self.tokens -= n
            return True
        return False

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now

    def full_at(self) -> float:
        """When the bucket is full again (a peer quiet since then is indistinguishable from a new one)."""
        if math.isinf(self.rate):
            return self.last
        return self.last + (self.burst - self.tokens) / self.rate


@dataclass
class Budget:
    """One peer's two buckets: messages and bytes."""

    messages: TokenBucket
    bytes: TokenBucket

    def take(self, nbytes: int, now: float) -> str | None:
        """Spend one message and ``nbytes``; None if both were there, else which one was short (nothing spent)."""
        self.messages.refill(now)
        if self.messages.tokens < 1.0:
            return "messages"
        if not self.bytes.take(now, nbytes):
            return "bytes"
        self.messages.tokens -= 1.0
        return None

    def full_at(self) -> float:
        return max(self.messages.full_at(), self.bytes.full_at())


class PeerLimits:
    """Message and byte budgets and stream counts, keyed by peer (the participant's name with CURVE, else the
    ROUTER routing id: a key that connects many times shares one budget)."""

    def __init__(
        self,
        rate: float,
        burst: float,
        max_streams: int,
        *,
        byte_rate: float = math.inf,
        byte_burst: float = math.inf,
        max_peers: int = 10_000,
    ) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.byte_rate = byte_rate
        self.byte_burst = max(1.0, byte_burst)
        self.max_streams = max_streams
        self.max_peers = max_peers
        self._budgets: OrderedDict[bytes, Budget] = OrderedDict()
        self._streams: dict[bytes, int] = {}
        self.refused = 0
        self.refused_by: dict[str, int] = {"messages": 0, "bytes": 0}
        """Messages refused for being over the message rate, and over the byte rate."""
        self.free = 0
        """Messages let through unmetered (traffic of a stream the peer has open)."""

    def admit(self, peer: bytes, msg_type: str, now: float, nbytes: int = 0, *, in_stream: bool = False) -> bool:
        """Whether ``peer`` may send one more message of ``msg_type`` and ``nbytes`` now; ``in_stream``: it belongs
        to a stream the peer has open (then, of the ``UNMETERED`` types, it is free)."""
        return self.check(peer, msg_type, now, nbytes, in_stream=in_stream) is None

    def check(self, peer: bytes, msg_type: str, now: float, nbytes: int = 0, *, in_stream: bool = False) -> str | None:
        """``admit``, saying why not: None (admitted), ``"messages"`` or ``"bytes"`` (the budget that ran out)."""
        if in_stream and msg_type in UNMETERED:
            self.free += 1
            return None
        budget = self._budgets.get(peer)
        if budget is None:
            budget = Budget(
                TokenBucket(self.rate, self.burst, self.burst, now),
                TokenBucket(self.byte_rate, self.byte_burst, self.byte_burst, now),
            )
            self._budgets[peer] = budget
            self._forget_idle(now)
        else:
            self._budgets.move_to_end(peer)
        short = budget.take(nbytes, now)
        if short is not None:
            self.refused += 1
            self.refused_by[short] += 1
        return short

    def open_stream(self, peer: bytes) -> bool:
        """Count one more incoming stream of ``peer``; False (and nothing counted) when at the cap."""
        n = self._streams.get(peer, 0)
        if n >= self.max_streams:
            return False
        self._streams[peer] = n + 1
        return True

    def close_stream(self, peer: bytes) -> None:
        n = self._streams.get(peer, 0) - 1
        if n > 0:
            self._streams[peer] = n
        else:
            self._streams.pop(peer, None)

    def streams(self, peer: bytes) -> int:
        return self._streams.get(peer, 0)

    def _forget_idle(self, now: float) -> None:
        """Drop the least recently seen budgets that are full again, while there are too many."""
        while len(self._budgets) > self.max_peers:
            peer, budget = next(iter(self._budgets.items()))
            if budget.full_at() > now:
                return  # the oldest is still paying off a burst: keep it (and everything newer)
            del self._budgets[peer]


@dataclass
class Burst:
    """Refusals of one kind (``code``, message ``type``) for one peer, close together: what was logged and audited
    of them."""

    peer: bytes
    user: str
    code: str
    reason: str
    """The first refusal's reason (later ones of the burst are alike, and not kept)."""
    type: str
    first: float
    last: float
    count: int = 1
    """Refusals in the burst so far."""
    reported: int = 1
    """Of them, how many a record has covered (the first refusal is reported as it happens)."""
    reported_at: float = 0.0
    answered_at: float = 0.0

    @property
    def unreported(self) -> int:
        return self.count - self.reported


class Refusals:
    """Refusal bursts by (peer, code, message type): the first refusal of a burst is the caller's to log, audit and
    answer; ``due`` hands back, once each, bursts with refusals not yet reported: ended ones (no refusal for ``gap``
    seconds) and long ones (every ``report_every`` seconds), so that a flood of N refusals is a handful of
    records whose counts add up to N."""

    def __init__(
        self, *, gap: float = 1.0, report_every: float = 30.0, answer_every: float = 1.0, max_open: int = 10_000
    ) -> None:
        self.gap = gap
        self.answer_every = answer_every
        self.report_every = report_every
        self.max_open = max_open
        self._open: OrderedDict[tuple[bytes, str, str], Burst] = OrderedDict()
        self.total: dict[str, int] = {}
        """Refusals by code, since the start."""
        self.bursts: dict[str, int] = {}
        """Bursts begun, by code."""

    def refuse(
        self, key: bytes, code: str, now: float, *, peer: bytes = b"", user: str = "", reason: str = "", type: str = ""
    ) -> tuple[bool, bool]:
        """Count one refusal of ``key``'s (whose budget: ``peer``, the routing id, is kept for the record) of this
        ``code`` and message ``type``. Returns (first, answer): whether it begins a burst (the caller logs and
        audits it) and whether to answer it: the first of a burst, then at most one every ``answer_every``
        seconds, so that a peer whose answer was lost (it was reconnecting) still hears, say, that it must
        say hello again, and a flooder hears once a second."""
        self.total[code] = self.total.get(code, 0) + 1
        bkey = (key, code, type[:32])
        burst = self._open.get(bkey)
        if burst is not None and now - burst.last < self.gap:
            burst.count += 1
            burst.last = now
            self._open.move_to_end(bkey)
            if now - burst.answered_at < self.answer_every:
                return False, False
            burst.answered_at = now
            return False, True
        if burst is not None:  # a burst that ended unnoticed by ``due``: its rest is reported with the next one
            self._open.pop(bkey)
        self._open[bkey] = Burst(
            peer or key, user, code, reason[:500], type[:32], now, now, reported_at=now, answered_at=now
        )
        self.bursts[code] = self.bursts.get(code, 0) + 1
        while len(self._open) > self.max_open:  # made-up routing ids: the oldest burst goes unreported
            self._open.popitem(last=False)
        return True, True

    def due(self, now: float) -> list[Burst]:
        """Bursts to report now (each returned with ``unreported`` > 0, then marked reported): ended ones are
        forgotten, long ones go on."""
        out: list[Burst] = []
        for key, burst in list(self._open.items()):
            ended = now - burst.last >= self.gap
            if burst.unreported and (ended or now - burst.reported_at >= self.report_every):
                out.append(replace(burst))
                burst.reported, burst.reported_at = burst.count, now
            if ended:
                del self._open[key]
        return out

    def flush(self) -> list[Burst]:
        """Every burst with refusals not yet reported (at shutdown)."""
        return self.due(math.inf)
