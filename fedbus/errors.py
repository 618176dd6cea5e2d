"""One exception tree for fedbus.

    FedbusError
     ├── ProtocolError
     │    ├── LocalProtocolError    this side misused the protocol API (a bug here)
     │    └── RemoteProtocolError   the peer sent something invalid (refuse it, keep serving)
     │         └── HeaderError      an untrusted safetensors header failed validation
     ├── TransportError             sockets, peers gone, timeouts on the bus
     ├── StrategyError              an aggregation rule was violated
     │    └── UpdateRejected        one update was refused (shape, dtype, NaN/Inf, staleness)
     ├── ConfigError                a config file, job folder or CLI value is invalid
     └── JobError                   a job failed or was aborted

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
