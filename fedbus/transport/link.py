"""A synchronous link socket: one DEALER connected to one address, and whether it is connected now.

The training script's end of a site's local link (``fedbus.client._link``) is plain blocking user code, so
its socket is a plain (not asyncio) zmq socket with its own context. Sends block up to ``send_timeout``;
``poll`` waits for a message and, meanwhile, reads the socket monitor's connect and disconnect events, so
``down_since`` says since when the link has had no connection (None: connected now).
"""

from __future__ import annotations

import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from fedbus.errors import TransportError


class SendTimeout(TransportError):
    """The peer took no message for the socket's send timeout (its queue stayed full, or it never connected)."""


class LinkSocket:
    """A synchronous DEALER to ``address``; ``down_since`` is when it was last seen without a connection."""

    def __init__(self, address: str, *, send_timeout: float) -> None:
        self.address = address
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.SNDTIMEO, int(send_timeout * 1000))
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.sock.connect(address)
        self.down_since: float | None = time.monotonic()  # until the first EVENT_CONNECTED
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self.monitor, zmq.POLLIN)

    def send(self, frame: bytes) -> None:
        """Send one frame, blocking up to the send timeout: SendTimeout after it, TransportError on failure."""
        try:
            self.sock.send(frame)
        except zmq.Again as exc:
            raise SendTimeout(f"{self.address} took no message") from exc
        except zmq.ZMQError as exc:
            raise TransportError(str(exc)) from exc

    def send_now(self, frame: bytes) -> bool:
        """Send one frame if it can go without blocking; whether it went."""
        try:
            self.sock.send(frame, zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def poll(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a message (connection events seen meanwhile update ``down_since``);
        whether one is there to ``recv``."""
        events = dict(self._poller.poll(int(timeout * 1000)))
        if self.monitor in events:
            self._drain_monitor()
        return self.sock in events

    def recv(self) -> list[bytes]:
        """The frames of the next message (blocks until there is one: ``poll`` first)."""
        return self.sock.recv_multipart()

    def _drain_monitor(self) -> None:
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                self.down_since = None
            elif event == zmq.EVENT_DISCONNECTED and self.down_since is None:
                self.down_since = time.monotonic()

    def close(self) -> None:
        """Close the socket (what was sent still leaves within the linger second) and the context."""
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close()
        self.ctx.term()
