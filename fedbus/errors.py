"""One exception tree for fedbus: whose fault an error is decides who must act on it.

    FedbusError
     ├── ProtocolError
     │    ├── LocalProtocolError    this side misused the protocol API (a bug here: fix the caller)
     │    └── RemoteProtocolError   the peer sent something invalid (refuse it, keep serving)
     │         ├── PeerError        ... and the peer has a name (a site, an admin): ``peer`` says who
     │         ├── HeaderError      an untrusted safetensors header failed validation
     │         └── BadMessage       an undecodable message, with the sender's routing id
     │                              (``fedbus.transport.endpoint``)
     ├── TransportError             sockets, peers gone, timeouts on the bus
     │    └── PeerUnreachable       a ROUTER has no connection to that peer now (the message is lost)
     ├── StrategyError              an aggregation rule was violated
     │    └── UpdateRejected        one update was refused (shape, dtype, NaN/Inf, staleness)
     ├── ConfigError                a config file, job folder, recipe or CLI value is invalid
     └── JobError                   a job failed or was aborted

The Local/Remote split is h11's: a daemon that meets a ``RemoteProtocolError`` refuses the message, tells the
peer why and keeps serving every other peer; a ``LocalProtocolError`` is a bug on this side and is not answered
to anybody. The broker raises ``PeerError`` for what a known peer did wrong (a site's hello, a message its role
or job does not allow, an admin's malformed request), so the log line and the refusal both name the culprit.

Foreign errors (zmq, safetensors, msgpack, tomllib) are mapped to these at one boundary with
``raise ... from``; only ``fedbus.cli`` turns them into exit codes.
"""

from __future__ import annotations


class FedbusError(Exception):
    """Base of every error fedbus raises on purpose."""


class ProtocolError(FedbusError):
    """A message or stream violated the fedbus protocol."""


class LocalProtocolError(ProtocolError):
    """This side misused the protocol API: a bug in the caller."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid: refuse it and keep serving."""


class PeerError(RemoteProtocolError):
    """A named peer misbehaved: a site or an admin sent what its role, state or job does not allow.

    ``peer`` names it (a site's name, an admin's participant name, else its routing id in hex) and leads the
    message, so a refusal logged or sent back says whose fault it was; ``reason`` is the rest."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"{peer}: {reason}")
        self.peer = peer
        self.reason = reason

    def __reduce__(self) -> tuple[type[PeerError], tuple[str, str]]:  # pickles with both arguments
        return type(self), (self.peer, self.reason)


class HeaderError(RemoteProtocolError):
    """An untrusted safetensors header failed validation."""


class TransportError(FedbusError):
    """The bus failed: a socket error, a peer gone, a stream that stalled."""


class PeerUnreachable(TransportError):
    """A ROUTER has no connection to that peer right now: it is gone, or reconnecting (a message to it is lost)."""


class StrategyError(FedbusError):
    """An aggregation strategy could not proceed."""


class UpdateRejected(StrategyError):
    """One update was refused; the reason names why (shape, dtype, NaN/Inf, staleness)."""


class ConfigError(FedbusError):
    """A config file, job folder, recipe or CLI value is invalid."""


class JobError(FedbusError):
    """A job failed or was aborted."""
