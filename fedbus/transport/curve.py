"""CurveZMQ for fedbus: key files, and the broker's ZAP authenticator (the participants file: ``fedbus.security``).

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
import os
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, cast

import zmq
import zmq.asyncio
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from fedbus.errors import ConfigError, TransportError
from fedbus.log import get_logger

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


def curve_keypair() -> tuple[bytes, bytes]:
    """A fresh CURVE keypair (public, secret), z85-encoded."""
    return zmq.curve_keypair()


def decode_z85(text: bytes) -> bytes:
    """The bytes of z85 ``text`` (a public key's 40 characters: 32 bytes); ValueError or KeyError if it is not."""
    return z85.decode(text)


class AllowList(Protocol):
    """What the ZAP handler asks of the participants file (``fedbus.security.Participants``)."""

    @property
    def by_key(self) -> Mapping[str, Any]:
        """z85 public key -> a participant with ``name`` and ``revoked``."""
        ...

    def refresh(self) -> list[str]: ...


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

    def __init__(self, ctx: zmq.asyncio.Context, participants: AllowList, on_refuse: Refusal) -> None:
        self.ctx = ctx
        self.participants = participants
        self.on_refuse = on_refuse
        self.sock: zmq.asyncio.Socket | None = None
        self._cooling: dict[str, float] = {}  # participant name -> refused until (time.monotonic())
        self._reported: dict[str, float] = {}  # participant name -> the cool-down whose refusal was reported

    def refuse_for(self, name: str, seconds: float) -> None:
        """Refuse participant ``name``'s key for ``seconds`` (the broker cut one of its connections off: it did
        not read). The first connection refused in that time is reported; the rest, a reconnect storm, silently."""
        self._cooling[name] = time.monotonic() + seconds

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
        until = self._cooling.get(p.name)
        if until is not None:
            if time.monotonic() < until:
                reason = "cooling down: a connection of this key did not read"
                if self._reported.get(p.name) != until:  # once per cool-down
                    self._reported[p.name] = until
                    return self._refuse(rid, reason, address=addr, key=key, name=p.name)
                return [ZAP_VERSION, rid, b"400", reason.encode(), b"", b""]
            del self._cooling[p.name]
            self._reported.pop(p.name, None)
        return [ZAP_VERSION, rid, b"200", b"OK", p.name.encode(), b""]

    def _refuse(self, rid: bytes, reason: str, **details: Any) -> list[bytes]:
        log.warning("connection refused", reason=reason, **details)
        self.on_refuse(reason, details)
        return [ZAP_VERSION, rid, b"400", reason.encode()[:200], b"", b""]

    async def watch(self, sock: zmq.Socket) -> None:
        """Report handshakes that fail before or after ZAP (monitor events of the broker's ROUTER, a socket of
        this authenticator's asyncio context)."""
        events = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        # The monitor is made by the socket's context, so it is an asyncio socket whatever ``sock`` is;
        # pyzmq types it as a socket of sock's own class.
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


async def handshake_refused(sock: zmq.Socket | zmq.asyncio.Socket) -> str:
    """A CURVE client's view: wait until the broker refuses our handshake and return why (never, if it
    accepts: cancel the wait). libzmq retries refused handshakes by itself, so without this a client with a
    revoked key would only ever see silence. TransportError once the socket is closed."""
    try:
        monitor = cast(zmq.asyncio.Socket, sock.get_monitor_socket(sum(_HANDSHAKE_FAILED)))
    except zmq.ZMQError as exc:
        raise TransportError(f"cannot watch the socket's handshakes: {exc}") from exc
    try:
        msg = parse_monitor_message(await monitor.recv_multipart())
        if msg["event"] == zmq.EVENT_MONITOR_STOPPED:
            raise TransportError("the socket was closed")
        if msg["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return f"key refused (ZAP status {msg['value']}): unknown or revoked key"
        return _HANDSHAKE_FAILED.get(msg["event"], "handshake failed") + " (is broker_key the broker's key?)"
    except zmq.ZMQError as exc:
        raise TransportError(f"the socket was closed: {exc}") from exc
    finally:
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        monitor.close(linger=0)
