"""Frames, peers, credit and streams of bytes over ZeroMQ; the only package that imports zmq.

``Context`` (``fedbus.transport.context``) is loaded on first use, so importing a module of this package
costs no more than that module.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "Context":
        from fedbus.transport.context import Context

        return Context
    raise AttributeError(f"module 'fedbus.transport' has no attribute {name!r}")
