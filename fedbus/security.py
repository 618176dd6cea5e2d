"""CurveZMQ for fedbus: key files, the participants file, and the broker's ZAP authenticator.

Theory of operation. Every peer has a Curve25519 keypair in pyzmq's certificate files (``NAME.key``
public, ``NAME.key_secret`` secret, 0600). A site or admin connects as a CURVE client knowing the broker's
public key, so the broker is authenticated to it and every byte is encrypted. The broker is a CURVE server;
libzmq asks it, once per connection, through ZAP (``inproc://zeromq.zap.01`` in the broker's context)
whether the client's public key may connect. Our handler looks the key up in ``participants.toml``
(re-read whenever its mtime changes) and answers with the participant's *name* as ZAP User-Id, which
libzmq then stamps on every message of that connection (``Incoming.user``). The broker binds identity to
that stamp, never to what a message claims: a site's hello must name the site its key belongs to, a
request must come from an admin key, and every later message is checked against the key's participant
again, so a key revoked while connected is refused from its next message on.

Why our own handler and not ``zmq.auth.AsyncioAuthenticator``: that one allows a folder of keys but maps
a key to no name, knows no roles, and does not tell us about refusals, which the audit trail must record.

Why a site's routing id carries a secret-derived token (``site:NAME:TOKEN``): the broker's ROUTER lets a
reconnecting peer take over its old routing id (so streams resume); with a guessable id another valid
key could take over a site's route before sending anything. The token is a hash of the site's secret
key: stable across reconnects, unknown to everyone else, and only ever sent encrypted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import zmq
import zmq.asyncio
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from fedbus.config import is_safe_name, read_toml
from fedbus.errors import ConfigError, TransportError
from fedbus.log import get_logger

ROLES = ("site", "admin")
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = "fedbus"
ZAP_VERSION = b"1.0"
log = get_logger("security")


# --- key files ----------------------------------------------------------------------------------------------


def create_keypair(folder: Path, name: str) -> tuple[Path, Path]:
    """Write ``folder/NAME.key`` and ``NAME.key_secret`` (0600); returns (public path, secret path)."""
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(folder), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The z85 public key of a certificate file (public or secret); ConfigError naming the file otherwise."""
    public, _ = _load(path)
    return public


def load_secret_key(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) of a ``.key_secret`` file, which must not be readable by group or others."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the secret key: {exc.strerror or exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path}: a secret key must be private to its owner (chmod 600 {path})")
    public, secret = _load(path)
    if secret is None:
        raise ConfigError(f"{path}: holds no secret key (is it the public .key file?)")
    return public, secret


def _load(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable ZeroMQ certificate: {exc}") from exc
    if public is None or len(public) != 40:
        raise ConfigError(f"{path}: no valid public key in this certificate")
    return public, secret


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
            z85.decode(key.encode("ascii"))
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
    from fedbus.jobs import dumps_toml  # the one TOML writer

    lines = [f"# fedbus participants of project {project!r}: written by `fedbus provision`.", ""]
    lines.append("# The broker re-reads this file when it changes: set revoked = true to refuse a key at once.")
    body = ""
    for p in participants:
        entry = {"name": p.name, "role": p.role, "key": p.key, "revoked": p.revoked}
        body += "\n[[participant]]\n" + dumps_toml(entry)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n" + body)
    os.replace(tmp, path)


# --- the ZAP handler ------------------------------------------------------------------------------------------

Refusal = Callable[[str, dict[str, Any]], None]
"""Called with (reason, details) for every refused connection: the broker writes it to its audit log."""

_HANDSHAKE_FAILED: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed: connection dropped (a plaintext peer? wrong broker key?)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake failed: wrong security mechanism or protocol (a plaintext peer?)",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake failed: authentication refused",
}


class Authenticator:
    """The broker's ZAP handler and handshake watcher, on the broker's event loop.

    ``serve()`` answers ZAP requests: CURVE only, the key must belong to a participant that is not
    revoked; the reply's User-Id is the participant's name. It also watches the ROUTER's monitor for
    handshakes that fail before ZAP is asked (a plaintext peer, a client with a wrong broker key) and
    reports them too.
    """

    def __init__(self, ctx: zmq.asyncio.Context, participants: Participants, on_refuse: Refusal) -> None:
        self.ctx = ctx
        self.participants = participants
        self.on_refuse = on_refuse
        self.sock: zmq.asyncio.Socket | None = None

    def start(self) -> None:
        """Bind the ZAP endpoint; must happen before the ROUTER binds (else libzmq has nobody to ask)."""
        sock = self.ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConfigError(f"cannot start the ZAP authenticator (one per zmq context): {exc}") from exc
        self.sock = sock

    async def serve(self) -> None:
        assert self.sock is not None
        while True:
            frames = await self.sock.recv_multipart()
            await self.sock.send_multipart(self.answer(frames))

    def answer(self, frames: list[bytes]) -> list[bytes]:
        """The ZAP reply to one request (RFC 27): 200 with the participant's name, or 400 with the reason."""
        if len(frames) < 6:
            return [ZAP_VERSION, frames[1] if len(frames) > 1 else b"", b"500", b"malformed ZAP request", b"", b""]
        version, rid, _domain, address, _identity, mechanism = frames[:6]
        addr = address.decode("utf-8", "replace")
        if version != ZAP_VERSION:
            return [ZAP_VERSION, rid, b"500", b"unsupported ZAP version", b"", b""]
        if mechanism != b"CURVE" or len(frames) != 7 or len(frames[6]) != 32:
            return self._refuse(rid, f"mechanism {mechanism[:16].decode('ascii', 'replace')} refused", address=addr)
        self.participants.refresh()
        key = z85.encode(frames[6]).decode("ascii")
        p = self.participants.by_key.get(key)
        if p is None:
            return self._refuse(rid, "unknown key", address=addr, key=key)
        if p.revoked:
            return self._refuse(rid, "revoked key", address=addr, key=key, name=p.name)
        return [ZAP_VERSION, rid, b"200", b"OK", p.name.encode(), b""]

    def _refuse(self, rid: bytes, reason: str, **details: Any) -> list[bytes]:
        log.warning("connection refused", reason=reason, **details)
        self.on_refuse(reason, details)
        return [ZAP_VERSION, rid, b"400", reason.encode()[:200], b"", b""]

    async def watch(self, sock: zmq.asyncio.Socket) -> None:
        """Report handshakes that fail before or after ZAP (monitor events of the broker's ROUTER)."""
        events = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        monitor = cast(zmq.asyncio.Socket, sock.get_monitor_socket(events))
        try:
            while True:
                msg = parse_monitor_message(await monitor.recv_multipart())
                if msg["event"] == zmq.EVENT_MONITOR_STOPPED:  # the socket was closed (a rebind)
                    return
                reason = _HANDSHAKE_FAILED.get(msg["event"], "handshake failed")
                log.warning("connection refused", reason=reason, code=hex(msg["value"]))
                self.on_refuse(reason, {"code": hex(msg["value"])})
        finally:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            monitor.close(linger=0)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None


async def handshake_refused(sock: zmq.asyncio.Socket) -> str:
    """A CURVE client's view: wait until the broker refuses our handshake and return why (never, if it
    accepts: cancel the wait). libzmq retries refused handshakes by itself, so without this a client with a
    revoked key would only ever see silence."""
    monitor = cast(zmq.asyncio.Socket, sock.get_monitor_socket(sum(_HANDSHAKE_FAILED)))
    try:
        msg = parse_monitor_message(await monitor.recv_multipart())
        if msg["event"] == zmq.EVENT_MONITOR_STOPPED:
            raise TransportError("the socket was closed")
        if msg["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return f"key refused (ZAP status {msg['value']}): unknown or revoked key"
        return _HANDSHAKE_FAILED.get(msg["event"], "handshake failed") + " (is broker_key the broker's key?)"
    finally:
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        monitor.close(linger=0)
