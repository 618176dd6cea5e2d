"""Who is connected: sites with their liveness, and admins. Pure bookkeeping over ``now``.

A site is *online* from its hello until it says bye or stays silent for ``heartbeat_s × liveness``
(the Paranoid Pirate rule); then it is *gone* and its jobs are told. A site that comes back after it was
gone, or with a new session (restarted process), needs its jobs deployed again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fedbus.broker.store import FINAL_STATES

Arrival = Literal["new", "same", "back", "restarted"]
"""How a hello arrived: a site never seen; the session already online (a reconnect of the same process);
one that was gone; or a new process while the old session was still online (a crash restarted faster than
the liveness window: the old process's tasks died with it unless the site still holds them)."""


@dataclass
class SiteRecord:
    """One site as the broker knows it."""

    name: str
    peer: bytes
    session: str
    caps: dict
    last_seen: float
    online: bool = True
    jobs: set[str] = field(default_factory=set)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "online": self.online,
            "last_seen": self.last_seen,
            "caps": self.caps,
            "jobs": sorted(self.jobs),
        }


class Registry:
    """Sites by name and by routing id, plus the set of admin peers."""

    def __init__(self, heartbeat_s: float, liveness: int) -> None:
        self.expiry = heartbeat_s * liveness
        self.sites: dict[str, SiteRecord] = {}
        self._by_peer: dict[bytes, SiteRecord] = {}
        self.admins: set[bytes] = set()

    def hello(self, peer: bytes, name: str, session: str, caps: dict, now: float) -> tuple[SiteRecord, Arrival]:
        """Register or refresh a site; says how it arrived (see ``Arrival``)."""
        rec = self.sites.get(name)
        if rec is None:
            rec = SiteRecord(name, peer, session, caps, now)
            self.sites[name] = rec
            arrival: Arrival = "new"
        else:
            arrival = "back" if not rec.online else "same" if rec.session == session else "restarted"
            self._by_peer.pop(rec.peer, None)
            rec.peer, rec.session, rec.caps, rec.last_seen, rec.online = peer, session, caps, now, True
        self._by_peer[peer] = rec
        return rec, arrival

    def seen(self, peer: bytes, now: float) -> SiteRecord | None:
        rec = self._by_peer.get(peer)
        if rec is not None and rec.online:
            rec.last_seen = now
            return rec
        return None

    def by_peer(self, peer: bytes) -> SiteRecord | None:
        rec = self._by_peer.get(peer)
        return rec if rec is not None and rec.online else None

    def peer_of(self, name: str) -> bytes | None:
        rec = self.sites.get(name)
        return rec.peer if rec is not None and rec.online else None

    def leave(self, peer: bytes) -> SiteRecord | None:
        """The site said bye (or its connection was refused): it is gone now."""
        rec = self._by_peer.pop(peer, None)
        if rec is not None:
            rec.online = False
        return rec

    def expire(self, now: float) -> list[SiteRecord]:
        """Sites silent for longer than the liveness window: mark them gone and return them."""
        gone = [r for r in self._by_peer.values() if r.online and now - r.last_seen > self.expiry]
        for rec in gone:
            self.leave(rec.peer)
        return gone

    def online(self) -> list[str]:
        return sorted(r.name for r in self.sites.values() if r.online)


def held_job_verdict(job_id: str, job: Mapping[str, Any] | None, site: str) -> tuple[str, str] | None:
    """Whether a site that names ``job_id`` (in its hello, or in a result or event) must end it, given the store's
    record ``job`` of it: ``(cause, reason)`` for ``EndJob`` (``messages.END_CAUSES``), or None to let it run.

    Only the store decides, never the running controllers: a job the broker knows and will run again (waiting for
    its sites after a restart) is kept, however it looks now. A job that ended is ``ended``; one the store has no
    record of, or that runs on other sites only, is ``unknown`` (the site's kept uploads of it are of no use)."""
    if job is None:
        return "unknown", f"the broker has no record of job {job_id}"
    if job["state"] in FINAL_STATES:
        why = f": {job['reason']}" if job.get("reason") else ""
        return "ended", f"the job {job['state']}{why}"
    if job["sites"] and site not in job["sites"]:
        return "unknown", f"job {job_id} does not run at site {site}"
    return None
