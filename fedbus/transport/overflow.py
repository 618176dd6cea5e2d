"""Peers whose queue is full: what a ROUTER does instead of waiting for them (pure bookkeeping, ``now`` passed in).

Why. A ROUTER holds one outgoing queue per peer, of ``HWM`` messages. A peer that stops reading (hostile, or
hung) lets its queue fill; a send to it then fails with EAGAIN, and a ROUTER reports POLLOUT whatever any one
peer's queue holds, so waiting for room would spin (or, with a real wait, hold the sender's task on one peer
forever). So a ROUTER never waits: a message that does not fit is dropped and counted against its peer, and
a peer that stays full for ``stuck_after`` seconds (every send to it in that time found no room) is *cut
off* for ``cooldown`` seconds: its messages are dropped unread, nothing is sent to it, and the owner is told
once (``RouterEndpoint.on_stuck``) so that it can forget the peer's state and, with CURVE, refuse its key.

Well-behaved streams never come here: credit bounds what a stream has in flight (a window of chunks, far
below ``HWM`` messages; ``fedbus.config`` checks the broker's profile for it), and a peer that reads keeps
its queue short.

Memory is bounded: per-peer counts are kept for at most ``max_peers`` peers, the least recently full forgotten
first (the totals stay).
"""

from __future__ import annotations

from collections import OrderedDict


class Overflow:
    """Drops, full-since times and cut-off peers of one ROUTER, by routing id."""

    def __init__(self, *, stuck_after: float, cooldown: float, max_peers: int = 1024) -> None:
        self.stuck_after = stuck_after
        self.cooldown = cooldown
        self.max_peers = max_peers
        self.dropped: OrderedDict[bytes, int] = OrderedDict()
        """Messages dropped per peer because its queue was full (the most recent ``max_peers`` peers)."""
        self.dropped_total = 0
        self.ignored_total = 0
        """Messages to or from a cut-off peer, dropped without trying."""
        self.cut_off_total = 0
        self.dropped_from: dict[bytes, int] = {}
        """Messages received from each cut-off peer and dropped unread, since the owner last took them."""
        self._full_since: dict[bytes, float] = {}
        self._cut_off: dict[bytes, float] = {}  # peer -> until when

    def any_cut_off(self) -> bool:
        """Whether any peer is (or was, until asked again) cut off: the cheap test before ``cut_off``."""
        return bool(self._cut_off)

    def cut_off(self, peer: bytes, now: float) -> bool:
        """Whether ``peer`` is cut off now (a cool-down that has passed is forgotten here)."""
        until = self._cut_off.get(peer)
        if until is None:
            return False
        if now < until:
            return True
        del self._cut_off[peer]
        return False

    def ignored(self, sender: bytes | None = None) -> None:
        """One message to or from (``sender``) a cut-off peer dropped."""
        self.ignored_total += 1
        if sender is not None:
            self.dropped_from[sender] = self.dropped_from.get(sender, 0) + 1

    def take_dropped(self) -> dict[bytes, int]:
        """The messages dropped unread per cut-off peer since the last call (then forgotten)."""
        out, self.dropped_from = self.dropped_from, {}
        return out

    def full(self, peer: bytes, now: float) -> bool:
        """A message to ``peer`` found its queue full and was dropped; True when this cuts the peer off (it has
        been full for ``stuck_after`` seconds): once, the caller then tells the owner."""
        self.dropped_total += 1
        self.dropped[peer] = self.dropped.get(peer, 0) + 1
        self.dropped.move_to_end(peer)
        while len(self.dropped) > self.max_peers:
            self.dropped.popitem(last=False)
        if len(self._full_since) >= 4 * self.max_peers and peer not in self._full_since:
            self._full_since.pop(next(iter(self._full_since)))  # the oldest: a storm of made-up routing ids
        since = self._full_since.setdefault(peer, now)
        if now - since < self.stuck_after:
            return False
        self.cut(peer, now)
        return True

    def sent(self, peer: bytes) -> None:
        """A message to ``peer`` fit: it reads again, whatever it dropped before."""
        if self._full_since:
            self._full_since.pop(peer, None)

    def cut(self, peer: bytes, now: float, seconds: float | None = None) -> None:
        """Cut ``peer`` off for the cool-down, or ``seconds`` (the owner may do so for its own reasons too)."""
        self._full_since.pop(peer, None)
        if peer not in self._cut_off:
            self.cut_off_total += 1
        self._cut_off[peer] = now + (self.cooldown if seconds is None else seconds)
        if len(self._cut_off) > 4 * self.max_peers:  # expired ones, from a storm of made-up routing ids
            self._cut_off = {p: t for p, t in self._cut_off.items() if t > now}

    def cut_off_now(self, now: float) -> int:
        """How many peers are cut off now."""
        return sum(1 for t in self._cut_off.values() if t > now)
