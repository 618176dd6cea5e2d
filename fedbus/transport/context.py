"""The zmq context of a process's endpoints, as a type the layers above transport name without importing zmq.

A daemon (broker, site, admin, SimEnv) holds one ``Context`` and hands it to the endpoints it binds or
connects; ``daemon_context`` (``fedbus.transport.endpoint``) makes one with the right number of I/O threads.
A context is closed with its own ``destroy(linger=0)`` or ``term()``.
"""

from __future__ import annotations

import zmq
import zmq.asyncio

Context = zmq.asyncio.Context
"""An asyncio zmq context: what every endpoint of a daemon is made in."""

Socket = zmq.Socket
"""A zmq socket, as endpoints hold it (``RouterEndpoint.sock``): what the CURVE handshake watchers observe."""


def shared_context() -> Context:
    """The process's one context (``zmq.asyncio.Context.instance()``), made by whichever caller asks first."""
    return Context.instance()
