"""Replies too big for an envelope (a long job's history) travel as a payload frame and arrive whole."""

from __future__ import annotations

import msgpack

from fedbus.admin import _unpack_reply
from fedbus.broker.admin_requests import REPLY_INLINE_MAX, reply_message
from fedbus.protocol.envelope import MAX_ENVELOPE, decode, encode
from fedbus.protocol.messages import Reply


def test_small_replies_stay_inline() -> None:
    msg, payload = reply_message(7, {"job_id": "j"})
    assert payload == [] and msg.data == {"job_id": "j"}
    assert _unpack_reply(msg, []) is msg


def test_a_history_bigger_than_an_envelope_arrives_whole() -> None:
    history = [{"version": v, "time": v * 0.5, "metrics": {"accuracy": 0.5, "strategy/x": 1.0}} for v in range(5000)]
    data = {"job_id": "j", "history": history}
    assert len(msgpack.packb(data)) > MAX_ENVELOPE > REPLY_INLINE_MAX
    msg, payload = reply_message(3, data)
    wire, _ = decode(encode(msg))  # the envelope itself stays small and valid
    got = _unpack_reply(wire, [memoryview(p) for p in payload])
    assert got.ok and got.rid == 3 and got.data == data


def test_a_garbled_payload_is_a_failed_reply_not_a_crash() -> None:
    msg = Reply(rid=1, ok=True, data={"payload": "msgpack"})
    assert not _unpack_reply(msg, []).ok
    assert not _unpack_reply(msg, [memoryview(b"\xc1\xc1")]).ok
    assert not _unpack_reply(msg, [memoryview(msgpack.packb([1, 2]))]).ok
