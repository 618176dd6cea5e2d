"""The broker's upload slots: big result streams take turns on them, and one that stalls loses its turn.

A result stream above one chunk is spooled to disk and needs one of a few slots (``upload_slots``, 2 on a small
machine), each holding up to a credit window of memory. Without more, a site that offers its result, takes the
credit and sends no chunk (a slow-loris upload) holds its slot until the stream's stall timeout (60 s), and a few
such sites hold every slot: every other site's upload waits behind them.

Two rules keep the slots moving:

* **A stalled upload loses its slot to a waiting one.** While an upload waits for a slot, a holder whose stream
  has received no chunk for ``upload_stall_s`` seconds is aborted: its site hears the reason (an ``ABORT`` on
  the stream), its task fails, blamed on the site, and its slot goes to the waiting upload. The bound: a sender
  that holds credit always has something to send, and each chunk that arrives is progress, so a legitimate
  upload, however slow its link, shows progress at least once per chunk time (2 MiB chunks: 10 s is a link of
  about 1.7 Mbit/s). Past that, the stream is stalled, not slow. No upload is aborted while none waits: a
  stream that merely stalls is the stall timeout's business (it is resumed or aborted), as before.
* **Turns go to those with least.** A freed slot goes to the waiting upload whose site holds fewest slots now,
  then whose site has had fewest uploads taken away for stalling (a site that stalled once waits behind those
  that never did), then the one that came first.
* **Sites that stalled are on probation.** A site with an upload taken away (a strike) loses its slot four times
  sooner (``upload_stall_s / 4``) while others wait, and such sites together hold at most all slots but one, so
  one slot is always left to the sites that never stalled: a few stalling sites cannot make every honest upload
  wait out a bound. A struck site is forgiven after ``FORGIVE_AFTER`` uploads it completed.

Progress and aborts go through callables the caller passes (the stream hub's view of the stream), so this
module holds only the turn-taking; it runs on the broker's event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fedbus.log import get_logger

log = get_logger("broker.uploads")

STRUCK_FACTOR = 4.0
"""A site whose upload was taken away for stalling is given ``upload_stall_s / STRUCK_FACTOR`` next time."""

FORGIVE_AFTER = 3
"""Uploads a struck site completes (through a slot) before its strikes are forgotten."""

LOG_EVERY = 30.0
"""Seconds between two log lines about one site's stalled uploads (the ones between are counted)."""


@dataclass(eq=False)
class Holder:
    """One upload that wants or holds a slot: ``progress()`` is its bytes received so far (None before its stream
    opened), ``abort(reason)`` ends its stream (False if it is not open any more)."""

    site: str
    progress: Callable[[], int | None]
    abort: Callable[[str], bool]
    seq: int = 0
    seen: int = 0
    since: float = 0.0  # when ``seen`` last changed (or the slot was granted)
    taken: bool = False  # aborted for stalling: its slot comes back when its stream ends
    granted: asyncio.Future[None] | None = field(default=None, repr=False)


@dataclass
class _Record:
    strikes: int = 0
    completed: int = 0  # uploads completed since the last strike
    logged_at: float = -1e9
    unlogged: int = 0


class UploadSlots:
    """``slots`` big uploads at once; holders that stall lose their slot to waiters (see the module's doc)."""

    def __init__(self, slots: int, stall_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = slots
        self.stall_s = stall_s
        self.clock = clock
        self.tick = min(1.0, max(0.05, stall_s / 8))
        """How often a waiting upload looks for a stalled holder."""
        self.held: set[Holder] = set()
        self.waiting: list[Holder] = []
        self.taken_total = 0
        """Uploads aborted for stalling while another waited, since the start (a metric)."""
        self._sites: dict[str, _Record] = {}
        self._seq = itertools.count()

    def holding(self, site: str) -> int:
        return sum(1 for h in self.held if h.site == site)

    async def acquire(self, holder: Holder) -> Holder:
        """Wait for a slot (the best placed waiter gets the next free one); while waiting, take the slot of a
        stalled holder. Returns ``holder``, now holding a slot until ``release``."""
        holder.seq = next(self._seq)
        holder.granted = asyncio.get_running_loop().create_future()
        self.waiting.append(holder)
        self._grant()
        try:
            while not holder.granted.done():
                self.reclaim()
                await asyncio.wait({holder.granted}, timeout=self.tick)
        except BaseException:
            if holder in self.waiting:
                self.waiting.remove(holder)
            elif holder in self.held:  # granted as it was cancelled: the slot goes on
                self.release(holder, completed=False)
            raise
        return holder

    def release(self, holder: Holder, *, completed: bool) -> None:
        """``holder``'s upload ended (``completed``: received whole); its slot goes to the next waiter."""
        self.held.discard(holder)
        if completed and not holder.taken:
            rec = self._sites.get(holder.site)
            if rec is not None and rec.strikes:
                rec.completed += 1
                if rec.completed >= FORGIVE_AFTER:
                    rec.strikes = rec.completed = 0
        self._grant()

    def reclaim(self) -> None:
        """Abort holders without progress past their bound, as many as there are uploads waiting without a slot
        already on its way to them, longest stalled first."""
        if not self.waiting:
            return
        now = self.clock()
        owed = len(self.waiting) - sum(1 for h in self.held if h.taken)
        stalled: list[Holder] = []
        for h in self.held:
            if h.taken:
                continue
            got = h.progress() or 0
            if got != h.seen:
                h.seen, h.since = got, now
            elif now - h.since >= self._bound(h.site):
                stalled.append(h)
        if not any(not self._struck(w.site) for w in self.waiting) and not self._probation_free():
            stalled = [h for h in stalled if self._struck(h.site)]  # only a struck upload could use the slot
        stalled.sort(key=lambda h: h.since)
        for h in stalled[: max(0, owed)]:
            self._take(h, now)

    def _struck(self, site: str) -> bool:
        rec = self._sites.get(site)
        return rec is not None and rec.strikes > 0

    def _probation_free(self) -> bool:
        """Whether a struck site's upload may take a slot now (see the module's doc)."""
        return sum(1 for h in self.held if self._struck(h.site)) < max(1, self.slots - 1)

    def _bound(self, site: str) -> float:
        return self.stall_s / STRUCK_FACTOR if self._struck(site) else self.stall_s

    def _take(self, h: Holder, now: float) -> None:
        idle = now - h.since
        reason = (
            f"upload stalled: no chunk for {idle:.1f} s while another upload waited for a slot"
            f" (upload_stall_s {self._bound(h.site):g} s)"
        )
        if not h.abort(reason):
            return  # its stream ended already: its slot is on its way back
        h.taken = True
        self.taken_total += 1
        rec = self._sites.setdefault(h.site, _Record())
        rec.strikes += 1
        rec.completed = 0
        rec.unlogged += 1
        if now - rec.logged_at >= LOG_EVERY:
            log.warning(
                "stalled upload aborted: its slot goes to a waiting upload",
                site=h.site,
                idle_s=round(idle, 1),
                aborted=rec.unlogged,
                strikes=rec.strikes,
            )
            rec.logged_at, rec.unlogged = now, 0

    def _grant(self) -> None:
        while len(self.held) < self.slots:
            allowed = self._probation_free()
            eligible = [w for w in self.waiting if allowed or not self._struck(w.site)]
            if not eligible:
                return
            best = min(eligible, key=self._rank)
            self.waiting.remove(best)
            best.since, best.seen = self.clock(), best.progress() or 0
            self.held.add(best)
            assert best.granted is not None
            if not best.granted.done():
                best.granted.set_result(None)

    def _rank(self, h: Holder) -> tuple[int, int, int]:
        rec = self._sites.get(h.site)
        return (self.holding(h.site), rec.strikes if rec is not None else 0, h.seq)
