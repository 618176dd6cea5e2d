"""The in-memory transport (``fedbus.transport.memory``): the endpoint interface over a hub, through the codec."""

from __future__ import annotations

import asyncio

import pytest

from fedbus.errors import PeerUnreachable
from fedbus.protocol.messages import Credit, Hello
from fedbus.transport.endpoint import BadMessage
from fedbus.transport.memory import MemoryHub

pytestmark = pytest.mark.timeout(10)


async def test_messages_and_payload_go_through_the_codec_and_are_copied_once() -> None:
    hub = MemoryHub()
    a, b = hub.endpoint(b"a", default_peer=b"b"), hub.endpoint(b"b")
    buf = bytearray(b"payload")
    await a.send(b"", Hello(role="site", name="a", session="s"), [buf])
    buf[:] = b"changed"  # the sender may reuse its buffer once send returned
    inc = await asyncio.wait_for(b.recv(), 5)
    assert inc.peer == b"a" and inc.msg == Hello(role="site", name="a", session="s")
    assert [bytes(p) for p in inc.payload] == [b"payload"]
    await b.send(inc.peer, Credit(sid=1, until=64))
    assert (await asyncio.wait_for(a.recv(), 5)).msg == Credit(sid=1, until=64)


async def test_a_bad_envelope_names_its_sender_and_a_closed_peer_is_unreachable() -> None:
    hub = MemoryHub()
    a, b = hub.endpoint(b"a"), hub.endpoint(b"b")
    b.inbox.put_nowait((b"a", [b"\xc1 not msgpack"]))
    with pytest.raises(BadMessage, match="not valid msgpack") as bad:
        await asyncio.wait_for(b.recv(), 5)
    assert bad.value.peer == b"a"
    b.close()
    with pytest.raises(PeerUnreachable, match="b'b'"):
        await a.send(b"b", Credit(sid=1, until=64))
    again = hub.endpoint(b"b")  # a peer back under its name, as after a reconnect
    b.close()  # the old endpoint closing again does not take the new one off the hub
    await a.send(b"b", Credit(sid=2, until=64))
    assert (await asyncio.wait_for(again.recv(), 5)).msg == Credit(sid=2, until=64)
