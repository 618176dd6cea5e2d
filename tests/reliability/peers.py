"""Raw peers for reliability tests: a DEALER that speaks the wire protocol by hand (real sockets), so a
test can misbehave exactly as it means to and watch what the broker answers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import zmq.asyncio

from fedbus.protocol.messages import Error, Hello, Message
from fedbus.transport.endpoint import BadMessage, DealerEndpoint, Incoming


class RawPeer:
    """One connected DEALER; ``inbox`` collects everything the broker sends back."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, identity: bytes) -> None:
        self.ep = DealerEndpoint.connect(ctx, address, identity=identity)
        self.inbox: list[Incoming] = []
        self.bad: list[BadMessage] = []
        self._arrived = asyncio.Event()
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            try:
                inc = await self.ep.recv()
            except BadMessage as exc:
                self.bad.append(exc)
                continue
            self.inbox.append(inc)
            self._arrived.set()

    async def send(self, msg: Message, payload: Sequence[Any] = ()) -> None:
        await self.ep.send(b"", msg, payload)

    async def send_raw(self, frames: list[bytes]) -> None:
        await self.ep.send_raw(frames)

    async def wait_for(self, pred: Any, timeout: float = 10.0) -> Incoming:
        """The first received message for which ``pred(msg)`` holds (waits up to ``timeout``)."""
        async with asyncio.timeout(timeout):
            while True:
                for inc in self.inbox:
                    if pred(inc.msg):
                        return inc
                self._arrived.clear()
                await self._arrived.wait()

    def errors(self, code: str) -> list[Error]:
        return [i.msg for i in self.inbox if isinstance(i.msg, Error) and i.msg.code == code]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.ep.close()


@contextlib.asynccontextmanager
async def raw_peer(address: str, identity: bytes, role: str | None = "admin") -> AsyncIterator[RawPeer]:
    """A raw peer, introduced as ``role`` (welcomed before it is yielded) unless role is None."""
    ctx = zmq.asyncio.Context()
    peer = RawPeer(ctx, address, identity)
    try:
        if role is not None:
            await peer.send(Hello(role=role, name=identity.decode(errors="replace")[:64], session="s"))
            await peer.wait_for(lambda m: m.TYPE == "welcome")
        yield peer
    finally:
        await peer.close()
        ctx.destroy(linger=0)
