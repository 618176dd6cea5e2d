"""The broker's door: every inbound message metered before any work, every refusal told once per burst, and
peers that stop reading cut off.

Theory of operation. The receive loop asks ``admit`` about each message as soon as its envelope is decoded
(the envelope is capped, its payload untouched): the peer's budget (``fedbus.broker.limits.PeerLimits``) is
charged one message and the message's bytes, unless the message belongs to a model stream the peer has open
(credit bounds those). A peer is its participant name with CURVE (one budget for a key, however many
connections it opens), else its routing id. Messages over budget are dropped.

Refusals (over budget, unauthorized, undecodable, no hello yet, refused by a handler) all go through
``refuse``: counted by (peer, code, type) into bursts (``fedbus.broker.limits.Refusals``); the first refusal of
a burst is logged, audited and answered, later ones counted and answered once a second (a peer whose answer was
lost, reconnecting, still hears that it must say hello), and ``report`` (called at the heartbeat
period) writes one log line and one audit record per burst with the count since, so that N refusals cost a
handful of lines whose ``count`` fields add up to N. A handler's refusal of an authorized request
(code ``refused``) is answered every time, since an admin waits for its answer; the peer's budget bounds those.

Shed. A routing id refused ``SHED_AFTER`` times within ``SHED_WINDOW_S`` floods: it is cut off for ``SHED_S``
(``RouterEndpoint.cut``), so that its messages are dropped on receipt, before any decode, meter or answer (a
dictionary lookup each instead of the whole refusal path), and what it left queued when it goes is drained as
cheaply. No well-behaved peer comes near: the most refusals one can earn at once is a stream's credit window of
chunks (at most 1,024 messages), sent to a restarted broker before the site says hello again. Logged and
audited once per shedding; what it sends meanwhile is counted and reported with the refusals (``report``: code
``cut_off``), so the records still account for every message. When the flood goes on, it is shed again.

Cut off. The broker's ROUTER drops what does not fit a peer's queue and cuts off a peer that stays full
(``fedbus.transport.overflow``); ``cut_off`` is then called (on the loop, soon after the send that found it):
the peer's streams are aborted, a site is declared gone, an admin forgotten, and with CURVE its key is
refused by ZAP for the cool-down, so that it cannot reconnect meanwhile.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from fedbus.broker.guard import Guard
from fedbus.broker.limits import UNMETERED, PeerLimits, Refusals
from fedbus.config import BrokerConfig
from fedbus.log import get_logger
from fedbus.protocol.messages import Message

log = get_logger("broker")

MiB = 1 << 20
AUDITED = frozenset({"rate_limited", "unauthorized", "bad_message", "refused", "internal", "cut_off"})
"""Refusal codes written to the audit trail (``hello_required`` is what a broker restart makes every site hear)."""
REPLY_EACH = frozenset({"refused"})
"""Refusal codes answered every time, not once per burst."""
SHED_AFTER = 2048
SHED_WINDOW_S = 1.0
SHED_S = 2.0
EVENTS = {
    "rate_limited": "peer over its request rate: refusing",
    "unauthorized": "message refused: not authorized",
    "bad_message": "bad message refused",
    "refused": "message refused",
    "internal": "message handler failed",
    "hello_required": "message before hello refused",
}


class Meter:
    """Budgets, refusal bursts and cut-offs of one broker (``answer`` sends an ``error``: the outbox's)."""

    def __init__(self, config: BrokerConfig, guard: Guard, *, answer: Any, holds: Any = None) -> None:
        """``answer(peer, code, reason, ref)`` sends an error; ``holds(peer, sid)``: whether that stream is open."""
        self.config = config
        self.guard = guard
        self.answer = answer
        self.holds = holds
        self.limits = PeerLimits(
            config.max_requests_per_s,
            config.request_burst,
            config.max_streams_per_peer,
            byte_rate=config.max_mb_per_s * MiB,
            byte_burst=config.mb_burst * MiB,
        )
        self.refusals = Refusals()
        self._users: OrderedDict[bytes, str] = OrderedDict()  # routing id -> ZAP User-Id last seen on it
        self._recent: OrderedDict[bytes, list[float]] = OrderedDict()  # routing id -> [window start, refusals]
        self.shed: Any = None
        """``shed(peer, seconds)``: drop a flooding routing id's messages on receipt for ``seconds``."""
        self.dropped: Any = None
        """``dropped()``: the messages of cut-off peers dropped unread since the last call, per peer."""

    @staticmethod
    def key(peer: bytes, user: str) -> bytes:
        """Whose budget a message is charged to: the participant's with CURVE, else the routing id's."""
        return b"key:" + user.encode() if user else peer

    def user_of(self, peer: bytes) -> str:
        """The participant a routing id was last seen as (CURVE; else empty)."""
        return self._users.get(peer, "")

    async def admit(self, peer: bytes, user: str, msg: Message | None, size: int) -> bool:
        """Charge one message of ``size`` bytes (``msg`` None: an undecodable one) to its peer's budget; False
        (and a refusal counted) when over it."""
        if user and self._users.get(peer) != user:
            self._users[peer] = user
            if len(self._users) > self.limits.max_peers:
                self._users.popitem(last=False)
        msg_type = msg.TYPE if msg is not None else "bad_message"
        sid = getattr(msg, "sid", None)
        in_stream = msg_type in UNMETERED and sid is not None and self.holds is not None and self.holds(peer, sid)
        short = self.limits.check(self.key(peer, user), msg_type, time.monotonic(), size, in_stream=in_stream)
        if short is None:
            return True
        if short == "bytes":
            reason = f"over {self.config.max_mb_per_s:g} MiB/s: slow down"
        else:
            reason = f"over {self.config.max_requests_per_s:g} requests/s: slow down"
        await self.refuse(peer, user, "rate_limited", reason, msg_type)
        return False

    async def refuse(
        self, peer: bytes, user: str, code: str, reason: str, msg_type: str = "", **log_fields: Any
    ) -> bool:
        """One refusal: the first of a burst is logged, audited (codes in ``AUDITED``) and answered; later ones are
        counted, and answered once a second (every time for codes in ``REPLY_EACH``). Returns whether it was the
        first."""
        key = self.key(peer, user)
        now = time.monotonic()
        first, answer = self.refusals.refuse(key, code, now, peer=peer, user=user, reason=reason, type=msg_type)
        if self._floods(peer, now):
            self._shed(peer, user)
            return first
        if first:
            level = log.info if code == "hello_required" else log.warning
            level(
                EVENTS.get(code, "refused"),
                peer=peer[:80],
                user=user,
                type=msg_type[:32],
                code=code,
                count=1,
                reason=reason[:300],
                **log_fields,
            )
            if code in AUDITED:
                self.guard.refused(reason, peer=peer, user=user, type=msg_type, code=code, count=1)
        if answer or code in REPLY_EACH:
            await self.answer(peer, code, reason, msg_type)
        return first

    def _floods(self, peer: bytes, now: float) -> bool:
        """Count one refusal of ``peer``'s; True when that makes ``SHED_AFTER`` within ``SHED_WINDOW_S``."""
        if self.shed is None:
            return False
        window = self._recent.get(peer)
        if window is None or now - window[0] > SHED_WINDOW_S:
            window = self._recent[peer] = [now, 0.0]
            if len(self._recent) > self.limits.max_peers:
                self._recent.popitem(last=False)
        self._recent.move_to_end(peer)
        window[1] += 1
        if window[1] < SHED_AFTER:
            return False
        del self._recent[peer]
        return True

    def _shed(self, peer: bytes, user: str) -> None:
        self.shed(peer, SHED_S)
        log.warning(
            "peer shed: it floods refused messages", peer=peer[:80], user=user, refusals=SHED_AFTER, for_s=SHED_S
        )
        self.guard.audit.record("shed", peer=_text(peer), by=user or None, refusals=SHED_AFTER, for_s=SHED_S)

    def report(self, *, final: bool = False) -> None:
        """Bursts with refusals not yet reported: one log line and one audit record each, with the count; and the
        messages cut-off peers sent that were dropped unread, one line and record per peer with the count."""
        for peer, count in (self.dropped() if self.dropped is not None else {}).items():
            user = self.user_of(peer)
            reason = "dropped unread: the peer is cut off"
            log.warning("messages of a cut-off peer dropped", peer=peer[:80], user=user, code="cut_off", count=count)
            self.guard.refused(reason, peer=peer, user=user, type="", code="cut_off", count=count)
        for b in self.refusals.flush() if final else self.refusals.due(time.monotonic()):
            fields = {"peer": b.peer[:80], "user": b.user, "type": b.type, "code": b.code, "count": b.unreported}
            log.warning("refusals in a burst", reason=b.reason[:300], burst_s=round(b.last - b.first, 3), **fields)
            if b.code in AUDITED:
                peer = b.peer if not b.peer.startswith(b"key:") else b""
                self.guard.refused(
                    b.reason,
                    peer=peer,
                    user=b.user,
                    type=b.type,
                    code=b.code,
                    count=b.unreported,
                    burst_s=round(b.last - b.first, 3),
                )

    def cut_off(self, peer: bytes, why: str) -> None:
        """Audit a cut-off peer and, with CURVE, refuse its key for the cool-down."""
        user = self.user_of(peer)
        self.guard.audit.record(
            "cut_off", peer=_text(peer), by=user or None, reason=why, cooldown_s=self.config.stuck_peer_cooldown_s
        )
        if user:
            self.guard.cool_down(user, self.config.stuck_peer_cooldown_s)


def _text(peer: bytes) -> str:
    return peer.decode("ascii") if peer.isascii() and peer[:1] != b"\0" else peer.hex()
