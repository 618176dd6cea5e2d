"""The broker's gate: who may connect (CURVE + ZAP), who may do what (roles), and the audit trail.

Kept apart from the daemon so that the broker (``server.py``) only asks yes/no questions at a few points. Without keys
in the profile the gate is open exactly as before (plaintext, names as claimed) and only audits.

Rules with CURVE on (the participant is the ZAP User-Id stamped on the message, see fedbus.transport.curve):
* a message from a key that is unknown or revoked now is refused (it was accepted at connect, then revoked);
* a site's routing id must be ``site:NAME:TOKEN`` of its own name, and its hello must name that site;
* an admin key may say hello only as an admin, a site key only as a site: so only admin keys can submit,
  abort, download or list (a request needs an admin hello first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedbus.audit import AuditLog
from fedbus.config import BrokerConfig
from fedbus.log import get_logger
from fedbus.protocol.messages import Hello
from fedbus.security import Participants
from fedbus.transport.context import Context, Socket
from fedbus.transport.curve import Authenticator, load_secret_key
from fedbus.transport.endpoint import Incoming

log = get_logger("broker.guard")


class Guard:
    """Authentication, authorization and audit for one broker."""

    def __init__(self, config: BrokerConfig, workspace: Path) -> None:
        self.audit = AuditLog(workspace / "audit.jsonl", actor="broker", hold=True)
        self.participants: Participants | None = None
        self.secret: bytes | None = None
        self.public: bytes | None = None
        if config.secret_key is not None and config.participants is not None:
            self.public, self.secret = load_secret_key(config.secret_key)
            self.participants = Participants(config.participants)
        self.auth: Authenticator | None = None
        self._pending_revoked: list[str] = []

    @property
    def secure(self) -> bool:
        return self.participants is not None

    def start(self, ctx: Context) -> None:
        """Bind the ZAP handler (before the ROUTER binds)."""
        if self.participants is not None:
            self.auth = Authenticator(ctx, self.participants, self._connection_refused)
            self.auth.start()

    def tasks(self, sock: Socket, *, zap: bool = True) -> list[Any]:
        """The coroutines to run while serving: the ZAP loop (unless ``zap=False``: it runs already) and the
        handshake watcher of ``sock``."""
        if self.auth is None:
            return []
        return [self.auth.serve(), self.auth.watch(sock)] if zap else [self.auth.watch(sock)]

    def close(self) -> None:
        if self.auth is not None:
            self.auth.close()
        self.audit.close()

    # --- questions the daemon asks ------------------------------------------------------------------------

    def refusal(self, inc: Incoming) -> str | None:
        """Why this message must be refused (None: let it through)."""
        if self.participants is None:
            return None
        p = self.participants.allowed(inc.user)
        if p is None:
            return f"key of {inc.user or 'an unknown peer'!r} is revoked or unknown"
        if p.role == "site" and not inc.peer.startswith(f"site:{p.name}:".encode()):
            return f"routing id {inc.peer[:80]!r} does not belong to site {p.name!r}"
        return None

    def hello_refusal(self, user: str, msg: Hello) -> str | None:
        """Why this hello must be refused: a role or name the key does not have."""
        if self.participants is None:
            return None
        p = self.participants.allowed(user)
        if p is None:
            return f"key of {user!r} is revoked or unknown"
        if msg.role != p.role:
            return f"the key of {p.role} {p.name!r} may not say hello as {msg.role[:32]!r}"
        if msg.role == "site" and msg.name != p.name:
            return f"the key of site {p.name!r} may not register as site {msg.name[:64]!r}"
        return None

    def key_of(self, user: str) -> str | None:
        """The public key (z85) of a participant, for the audit trail."""
        if self.participants is None:
            return None
        p = self.participants.by_name.get(user)
        return p.key if p is not None else None

    def revoked_now(self) -> list[str]:
        """Names revoked since the last call (the file is re-read when it changed)."""
        if self.participants is None:
            return []
        self.participants.refresh()
        gone = self.participants.take_revoked()
        for name in gone:
            self.audit.record("revoked", site=name, key=self.key_of(name), reason="revoked in the participants file")
        return gone

    # --- audit ---------------------------------------------------------------------------------------------

    def refused(self, reason: str, *, peer: bytes = b"", user: str = "", type: str = "", **fields: Any) -> None:
        self.audit.record(
            "refused",
            by=user or None,
            key=self.key_of(user),
            peer=_peer(peer),
            type=type or None,
            reason=reason,
            **fields,
        )

    def cool_down(self, user: str, seconds: float) -> None:
        """Refuse ``user``'s key at connect for ``seconds`` (CURVE; without it there is no key to refuse)."""
        if self.auth is not None and user:
            self.auth.refuse_for(user, seconds)

    def _connection_refused(self, reason: str, details: dict[str, Any]) -> None:
        self.audit.record("connection_refused", reason=reason, by=details.get("name"), **_pick(details))


def _peer(peer: bytes) -> str | None:
    if not peer:
        return None
    return peer.decode("ascii") if peer.isascii() and peer[:1] != b"\0" else peer.hex()


def _pick(details: dict[str, Any]) -> dict[str, Any]:
    return {k: details[k] for k in ("key", "address", "code") if k in details}
