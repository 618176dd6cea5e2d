"""Who takes part: the participants file (the broker's allow-list) and the CURVE keys a site or admin names.

The CurveZMQ side (key files, the ZAP handler that asks this allow-list about every connection, the
handshake watchers) is ``fedbus.transport.curve``; this module holds what is not zmq: ``participants.toml``,
re-read when it changes, and the keys a profile names (``ClientKeys``). The module docstring of
``fedbus.transport.curve`` says how identity is bound to the CURVE key.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbus.config import is_safe_name, read_toml
from fedbus.errors import ConfigError
from fedbus.log import get_logger
from fedbus.transport.curve import decode_z85, load_public_key, load_secret_key

ROLES = ("site", "admin")
log = get_logger("security")


@dataclass(frozen=True)
class ClientKeys:
    """What a CURVE client (site, admin) needs: its own keypair and the broker's public key."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, secret_key: str | os.PathLike[str], broker_key: str | os.PathLike[str]) -> ClientKeys:
        public, secret = load_secret_key(secret_key)
        return cls(public, secret, load_public_key(broker_key))

    def as_tuple(self) -> tuple[bytes, bytes, bytes]:
        """(server, public, secret): the ``curve`` argument of ``DealerEndpoint.connect``."""
        return self.server, self.public, self.secret

    def routing_token(self) -> str:
        """A stable, secret-derived suffix for this peer's routing id (see the module docstring)."""
        return hashlib.blake2b(self.secret, digest_size=12, person=b"fedbus-route").hexdigest()


def client_keys(secret_key: str | None, broker_key: str | None, where: str) -> ClientKeys | None:
    """The keys a site/admin config names, or None for a plaintext profile; both or neither must be set."""
    if secret_key is None and broker_key is None:
        return None
    if secret_key is None or broker_key is None:
        missing = "secret_key" if secret_key is None else "broker_key"
        raise ConfigError(f"{where}: CURVE needs both secret_key and broker_key; {missing} is missing")
    return ClientKeys.load(secret_key, broker_key)


# --- the participants file ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Participant:
    name: str
    role: str
    key: str  # z85 public key
    revoked: bool = False


def parse_participants(doc: dict[str, Any], where: str) -> list[Participant]:
    """The ``[[participant]]`` tables of a participants file, each checked; ConfigError naming the entry."""
    entries = doc.get("participant", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: 'participant' must be an array of tables ([[participant]])")
    out: list[Participant] = []
    names: set[str] = set()
    keys: set[str] = set()
    for i, e in enumerate(entries):
        at = f"{where}: participant #{i + 1}"
        if not isinstance(e, dict):
            raise ConfigError(f"{at} must be a table")
        name, role, key, revoked = e.get("name"), e.get("role"), e.get("key"), e.get("revoked", False)
        if not is_safe_name(name):
            raise ConfigError(f"{at}: name must be 1-64 characters from [A-Za-z0-9_.-], got {name!r}")
        if role not in ROLES:
            raise ConfigError(f"{at} ({name}): role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(key, str) or len(key) != 40:
            raise ConfigError(f"{at} ({name}): key must be a 40-character z85 public key")
        try:
            decode_z85(key.encode("ascii"))
        except (ValueError, UnicodeEncodeError, KeyError) as exc:
            raise ConfigError(f"{at} ({name}): key is not z85: {exc}") from None
        if not isinstance(revoked, bool):
            raise ConfigError(f"{at} ({name}): revoked must be true or false")
        if name in names or key in keys:
            raise ConfigError(f"{at}: duplicate {'name' if name in names else 'key'} ({name})")
        names.add(name)
        keys.add(key)
        out.append(Participant(name, role, key, revoked))
    return out


class Participants:
    """The broker's allow-list, re-read when the file changes (mtime, size or inode), so revocations take effect
    without a restart. A file that becomes unreadable or invalid keeps the last good list (and is logged)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self.by_key: dict[str, Participant] = {}
        self.by_name: dict[str, Participant] = {}
        self._revoked: list[str] = []
        self.refresh(strict=True)
        if not self.by_name:
            log.warning("participants file lists nobody", path=str(self.path))

    def refresh(self, *, strict: bool = False) -> list[str]:
        """Re-read the file if it changed; returns the names revoked (or removed) by this change."""
        try:
            st = self.path.stat()
        except OSError as exc:
            if strict:
                raise ConfigError(f"{self.path}: cannot read the participants file: {exc.strerror or exc}") from exc
            return []
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)  # the inode: provision replaces the file
        if stamp == self._stamp:
            return []
        try:
            entries = parse_participants(read_toml(self.path), str(self.path))
        except ConfigError as exc:
            if strict:
                raise
            log.error("participants file invalid: keeping the previous list", reason=str(exc))
            self._stamp = stamp
            return []
        before = {n for n, p in self.by_name.items() if not p.revoked}
        self.by_key = {p.key: p for p in entries}
        self.by_name = {p.name: p for p in entries}
        self._stamp = stamp
        gone = sorted(n for n in before if self.allowed(n) is None)
        if gone:
            log.warning("participants revoked", names=gone)
            self._revoked.extend(gone)
        return gone

    def take_revoked(self) -> list[str]:
        """Names revoked since the last call, whoever noticed the change (the ZAP handler or the broker)."""
        out, self._revoked = self._revoked, []
        return out

    def allowed(self, name: str, role: str | None = None) -> Participant | None:
        """The participant named ``name`` if it exists, is not revoked and (if given) has ``role``."""
        p = self.by_name.get(name)
        if p is None or p.revoked or (role is not None and p.role != role):
            return None
        return p


def write_participants(path: Path, participants: Iterable[Participant], project: str) -> None:
    """participants.toml, replaced atomically (the broker may be reading it)."""
    from fedbus.toml_writer import dumps_toml

    lines = [f"# fedbus participants of project {project!r}: written by `fedbus provision`.", ""]
    lines.append("# The broker re-reads this file when it changes: set revoked = true to refuse a key at once.")
    body = ""
    for p in participants:
        entry = {"name": p.name, "role": p.role, "key": p.key, "revoked": p.revoked}
        body += "\n[[participant]]\n" + dumps_toml(entry)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n" + body)
    os.replace(tmp, path)
