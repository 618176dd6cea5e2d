"""Per-peer limits at the broker: a request rate (token bucket) and a count of streams in flight.

Why: every peer shares one broker loop. A peer that floods it with messages, or opens offer after offer,
must be refused on its own (an ``error`` reply naming the limit, one log line per burst of refusals) while
every other peer is served as before. Stream traffic that credit already bounds (chunks, credits, acks)
is not counted against the rate: a 10 GiB upload is thousands of chunks, and the receiver's window, not
this bucket, paces them.

Memory is bounded too: a peer identity is whatever a peer says it is, so buckets of peers that have been
quiet long enough to be full again are forgotten once more than ``max_peers`` are known.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from fedbus.protocol.messages import STREAM_TYPES

UNMETERED = STREAM_TYPES - {"offer"}
"""Message types the rate limit leaves alone: flow-controlled stream traffic. An offer opens a stream: metered."""


@dataclass
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``take`` spends one if there is one."""

    rate: float
    burst: float
    tokens: float
    last: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full_at(self) -> float:
        """When the bucket is full again (a peer quiet since then is indistinguishable from a new one)."""
        return self.last + (self.burst - self.tokens) / self.rate


class PeerLimits:
    """Request-rate buckets and stream counts, keyed by peer identity (the ROUTER routing id)."""

    def __init__(self, rate: float, burst: float, max_streams: int, *, max_peers: int = 10_000) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.max_streams = max_streams
        self.max_peers = max_peers
        self._buckets: OrderedDict[bytes, TokenBucket] = OrderedDict()
        self._streams: dict[bytes, int] = {}
        self._refusing: set[bytes] = set()  # peers inside a burst of refusals (told once per burst)
        self.refused = 0

    def admit(self, peer: bytes, msg_type: str, now: float) -> bool:
        """Whether ``peer`` may send one more message of ``msg_type`` now."""
        if msg_type in UNMETERED:
            return True
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, self.burst, now)
            self._buckets[peer] = bucket
            self._forget_idle(now)
        else:
            self._buckets.move_to_end(peer)
        if bucket.take(now):
            self._refusing.discard(peer)
            return True
        self.refused += 1
        return False

    def first_refusal(self, peer: bytes) -> bool:
        """True once per burst of refusals: the caller replies and logs then, not for every message."""
        if peer in self._refusing:
            return False
        self._refusing.add(peer)
        return True

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
        """Drop the least recently seen buckets that are full again, while there are too many."""
        while len(self._buckets) > self.max_peers:
            peer, bucket = next(iter(self._buckets.items()))
            if bucket.full_at() > now:
                return  # the oldest is still paying off a burst: keep it (and everything newer)
            del self._buckets[peer]
            self._refusing.discard(peer)
