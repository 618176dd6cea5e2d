"""The upload slots' turn-taking, on a made-up clock: a stalled holder loses its slot only while another upload
waits, a progressing one never does, struck sites wait behind clean ones and leave a slot to them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fedbus.broker.upload_slots import FORGIVE_AFTER, Holder, UploadSlots


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Upload:
    """An upload as its stream would show it: bytes received, and whether (and why) it was aborted."""

    def __init__(self, slots: UploadSlots, site: str) -> None:
        self.bytes = 0
        self.aborted: str | None = None
        self.holder = Holder(site, lambda: self.bytes, self._abort)
        self.slots = slots

    def _abort(self, reason: str) -> bool:
        self.aborted = reason
        self.slots.release(self.holder, completed=False)  # its stream ends: the slot comes back
        return True


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _slots(n: int) -> tuple[UploadSlots, Clock]:
    clock = Clock()
    slots = UploadSlots(n, 10.0, clock=clock)
    slots.tick = 0.001  # the waiters look often; the made-up clock decides what is stalled
    return slots, clock


async def _wait(slots: UploadSlots, up: Upload) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(slots.acquire(up.holder))
    await _settle()
    return task


@pytest.mark.asyncio
async def test_a_stalled_holder_keeps_its_slot_while_nobody_waits_and_loses_it_to_a_waiter() -> None:
    slots, clock = _slots(1)
    loris, good = Upload(slots, "loris"), Upload(slots, "good")
    await slots.acquire(loris.holder)
    clock.now = 100.0
    slots.reclaim()
    assert loris.aborted is None  # nobody waits: the stall timeout's business, not ours
    waiting = await _wait(slots, good)
    await asyncio.wait_for(waiting, 2)
    assert loris.aborted is not None and "upload stalled" in loris.aborted
    assert slots.taken_total == 1 and good.holder in slots.held


@pytest.mark.asyncio
async def test_a_holder_that_makes_progress_keeps_its_slot() -> None:
    slots, clock = _slots(1)
    slow, other = Upload(slots, "slow"), Upload(slots, "other")
    await slots.acquire(slow.holder)
    waiting = await _wait(slots, other)
    for _ in range(5):  # a chunk every 9 s: slow, never stalled past the 10 s bound
        clock.now += 9.0
        slow.bytes += 1 << 16
        await asyncio.sleep(0.02)  # the waiter looks (every ``tick``) and sees the chunk
    assert slow.aborted is None and not waiting.done()
    clock.now += 10.0
    await asyncio.wait_for(waiting, 2)
    assert slow.aborted is not None


@pytest.mark.asyncio
async def test_struck_sites_wait_behind_clean_ones_and_leave_them_a_slot() -> None:
    slots, clock = _slots(2)
    a, b = Upload(slots, "a"), Upload(slots, "b")
    await slots.acquire(a.holder)
    await slots.acquire(b.holder)
    clock.now = 20.0
    c1, c2 = Upload(slots, "c"), Upload(slots, "d")
    w1, w2 = await _wait(slots, c1), await _wait(slots, c2)
    await asyncio.wait_for(asyncio.gather(w1, w2), 2)
    assert a.aborted and b.aborted  # both struck now
    a2, b2 = Upload(slots, "a"), Upload(slots, "b")
    wa, wb = await _wait(slots, a2), await _wait(slots, b2)
    slots.release(c1.holder, completed=True)
    slots.release(c2.holder, completed=True)
    await _settle()
    assert sum(t.done() for t in (wa, wb)) == 1  # struck sites together hold all slots but one
    clean = Upload(slots, "e")
    we = await _wait(slots, clean)
    assert we.done()  # the slot left to sites that never stalled
    first = a2 if wa.done() else b2
    clock.now += 10.0 / 4  # a struck site's bound is a quarter, while the other struck one waits
    await asyncio.sleep(0.05)
    assert first.aborted is not None
    for t in (wa, wb, we):
        t.cancel()
    await asyncio.gather(wa, wb, we, return_exceptions=True)


@pytest.mark.asyncio
async def test_a_struck_site_is_forgiven_after_uploads_it_completed() -> None:
    slots, clock = _slots(1)
    loris = Upload(slots, "s")
    await slots.acquire(loris.holder)
    clock.now = 20.0
    await asyncio.wait_for(asyncio.ensure_future(slots.acquire(Upload(slots, "x").holder)), 2)
    assert slots._bound("s") < slots.stall_s
    slots.held.clear()
    for _ in range(FORGIVE_AFTER):
        up = Upload(slots, "s")
        await slots.acquire(up.holder)
        slots.release(up.holder, completed=True)
    assert slots._bound("s") == slots.stall_s
