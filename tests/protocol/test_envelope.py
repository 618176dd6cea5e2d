"""The envelope codec: every message round-trips; untrusted bytes only ever raise RemoteProtocolError."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbus.errors import LocalProtocolError, RemoteProtocolError
from fedbus.protocol import MAX_ENVELOPE, MESSAGE_TYPES, PROTOCOL_VERSION, Message, decode, encode
from fedbus.protocol.envelope import MAX_DEPTH, MAX_OFFER_ENVELOPE
from fedbus.protocol.messages import Chunk, Hello, fields_of

SAMPLES: dict[str, Any] = {
    "int": 7,
    "float": 1.5,
    "str": "name",
    "bytes": b"\x00\xffheader",
    "bool": True,
    "dict": {"lr": 0.01, "tags": ["a", "b"], "nested": {"k": None, "b": b"\x01"}},
    "list": [1, "two", 3.0, [4], {"five": 5}],
    "int|None": 11,
    "str|None": "inbox/t.safetensors",
    "float|None": 2.5,
}


def sample(cls: type[Message], *, required_only: bool = False) -> Message:
    kwargs = {}
    for f in dataclasses.fields(cls):
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if required_only and has_default:
            continue
        kwargs[f.name] = SAMPLES[str(f.type).replace(" ", "")]
    return cls(**kwargs)


def envelope(msg: Message, **changes: Any) -> bytes:
    body = msgpack.unpackb(encode(msg), raw=False)
    for k, v in changes.items():
        if v is DELETE:
            del body[k]
        else:
            body[k] = v
    return msgpack.packb(body, use_bin_type=True)


DELETE = object()


def reject(data: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode(data)


# --- round trips -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mtype", sorted(MESSAGE_TYPES))
@pytest.mark.parametrize("required_only", [False, True])
def test_round_trip_every_message_type(mtype: str, required_only: bool) -> None:
    msg = sample(MESSAGE_TYPES[mtype], required_only=required_only)
    assert decode(encode(msg, mid=42)) == (msg, 42)
    assert decode(memoryview(encode(msg))) == (msg, 0)


def test_optional_none_and_int_for_float() -> None:
    task = MESSAGE_TYPES["task"]("j", "t", "train", 1, 2, 3, None)
    assert decode(encode(task))[0] == task
    welcome, _ = decode(envelope(sample(MESSAGE_TYPES["welcome"]), heartbeat_s=5))
    assert welcome.heartbeat_s == 5  # type: ignore[attr-defined]


def test_encode_refuses_unregistered_messages() -> None:
    with pytest.raises(LocalProtocolError, match="not a registered message"):
        encode(Message())

    @dataclasses.dataclass(frozen=True, slots=True)
    class Fake(Message):
        TYPE = "hello"

    with pytest.raises(LocalProtocolError, match="Fake"):
        encode(Fake())


# --- specific rejections -----------------------------------------------------------------------------------

credit = MESSAGE_TYPES["credit"](1, 64)
hello = MESSAGE_TYPES["hello"]("site", "a", "s1")


def test_rejects_unknown_type_and_version() -> None:
    reject(envelope(credit, t="teleport"), "unknown message type 'teleport'")
    reject(envelope(credit, t=5), "unknown message type 5")
    reject(envelope(credit, t=DELETE), "unknown message type None")
    reject(envelope(credit, v=PROTOCOL_VERSION + 1), f"unsupported protocol version {PROTOCOL_VERSION + 1}")
    reject(envelope(credit, v=DELETE), "unsupported protocol version None")
    reject(envelope(credit, id="x"), "credit: field 'id' must be int")


def test_rejects_missing_extra_and_mistyped_fields() -> None:
    reject(envelope(credit, until=DELETE), "credit: missing field 'until'")
    reject(envelope(credit, zzz=1), r"credit: unknown field\(s\) \['zzz'\]")
    reject(envelope(credit, until="64"), "credit: field 'until' must be int, got str")
    reject(envelope(credit, until=64.0), "credit: field 'until' must be int, got float")
    reject(envelope(credit, until=True), "credit: field 'until' must be int, got bool")
    reject(envelope(credit, until=None), "credit: field 'until' must be int, got None")
    reply = MESSAGE_TYPES["reply"](1, True)
    reject(envelope(reply, ok=1), "reply: field 'ok' must be bool, got int")
    offer = MESSAGE_TYPES["offer"](1, 100, 64, "crc32", "d", b"h")
    reject(envelope(offer, header="h"), "offer: field 'header' must be bytes, got str")
    reject(envelope(offer, route=[1]), "offer: field 'route' must be dict, got list")
    welcome = sample(MESSAGE_TYPES["welcome"])
    reject(envelope(welcome, heartbeat_s=float("nan")), "welcome: field 'heartbeat_s' is NaN")


def test_control_fields_of_tasks_and_results_are_typed_and_checked() -> None:
    task = MESSAGE_TYPES["task"](
        "j", "t", "train", 1, 1, 3, 9, params_type="DIFF", path="inbox/t.safetensors", take=True
    )
    assert decode(encode(task))[0] == task
    reject(envelope(task, take="yes"), "task: field 'take' must be bool, got str")
    reject(envelope(task, take=1), "task: field 'take' must be bool, got int")
    reject(envelope(task, path=["inbox"]), "task: field 'path' must be str|None, got list")
    reject(envelope(task, params_type=2), "task: field 'params_type' must be str|None, got int")
    reject(envelope(task, model_name=None), "task: field 'model_name' must be str, got None")
    result = MESSAGE_TYPES["result"]("j", "t", 1, "FULL", 1.0, path="outbox/t.safetensors", train_s=0.25)
    assert decode(encode(result))[0] == result
    reject(envelope(result, train_s=float("nan")), "result: field 'train_s' is NaN")
    reject(envelope(result, train_s="0.25"), "result: field 'train_s' must be float|None, got str")
    reject(envelope(result, path=b"outbox"), "result: field 'path' must be str|None, got bytes")


def test_rejects_oversize_envelopes() -> None:
    hello_big = MESSAGE_TYPES["hello"]("site", "x" * MAX_ENVELOPE, "s")
    with pytest.raises(LocalProtocolError, match="cannot send hello: envelope of .* exceeds"):
        encode(hello_big)  # the sender finds out first
    reject(msgpack.packb({"v": PROTOCOL_VERSION, "t": "hello", **fields_of(hello_big)}), "hello: envelope of")
    reject(b"\x81" + bytes(MAX_OFFER_ENVELOPE), f"exceeds the {MAX_ENVELOPE}-byte limit")  # never even unpacked
    with pytest.raises(RemoteProtocolError, match="exceeds the 10-byte limit"):
        decode(encode(credit), max_size=10)


def test_an_offer_may_carry_the_header_of_a_model_with_many_tensors() -> None:
    """A 4 GiB model of 4,200 tensors has a 360 KB safetensors header: its offer must pass, up to its own cap."""
    offer = MESSAGE_TYPES["offer"](1, 1 << 32, 4 << 20, "sum64", "", b"h" * (2 * MAX_ENVELOPE))
    assert decode(encode(offer))[0] == offer
    with pytest.raises(LocalProtocolError, match="cannot send offer"):
        encode(MESSAGE_TYPES["offer"](1, 1 << 32, 4 << 20, "sum64", "", b"h" * MAX_OFFER_ENVELOPE))


def test_rejects_non_string_keys_and_deep_nesting() -> None:
    reject(envelope(hello, caps={b"k": 1}), "hello: field 'caps' has a non-string key")
    reject(envelope(hello, caps={"a": {b"k": 1}}), "hello: field 'caps' has a non-string key")
    # msgpack itself (strict_map_key) refuses int keys before any field is looked at
    reject(msgpack.packb({"v": PROTOCOL_VERSION, "t": "hello", 1: 2}), "not valid msgpack")
    deep: Any = 1
    for _ in range(MAX_DEPTH + 2):
        deep = [deep]
    reject(envelope(hello, caps={"d": deep}), f"hello: field 'caps' nests deeper than {MAX_DEPTH}")
    ok: Any = 1
    for _ in range(MAX_DEPTH - 1):
        ok = [ok]
    assert decode(envelope(hello, caps={"d": ok}))[0].caps == {"d": ok}  # type: ignore[attr-defined]
    for leaf in (1, "s", b"b", True, None):  # a leaf of any plain type one level past the limit is refused too
        edge: Any = leaf
        for _ in range(MAX_DEPTH):
            edge = [edge]
        reject(envelope(hello, caps={"d": edge}), f"hello: field 'caps' nests deeper than {MAX_DEPTH}")
    reject(envelope(hello, caps={"d": [1, {"x": [float("nan")]}]}), "hello: field 'caps' is NaN")
    reject(envelope(hello, caps={"t": msgpack.ExtType(5, b"x")}), "hello: field 'caps' holds a ExtType")


def test_rejects_garbage() -> None:
    reject(b"", "not valid msgpack")
    reject(b"\xc1", "not valid msgpack")
    reject(encode(credit) + b"\x00", "not valid msgpack")
    reject(msgpack.packb([1, "credit"]), "must be a map, got list")
    reject(b"\x92\x01", "not valid msgpack")


# --- property-based: untrusted input raises RemoteProtocolError or decodes ----------------------------------
# Hypothesis draws a seed and the structure is built from random.Random(seed): hypothesis's own recursive
# strategies cost milliseconds per example, and thousands of examples must fit the suite's time budget.

FIELD_NAMES = sorted({f.name for cls in MESSAGE_TYPES.values() for f in dataclasses.fields(cls)} | {"v", "t", "id"})
INTS = [0, 1, -1, 7, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, PROTOCOL_VERSION]
PROPS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**64 - 1)


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < MAX_DEPTH + 3 else 9)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice(INTS)
    if kind == 3:
        return rng.choice([0.0, -1.5, float("inf"), float("nan"), 1e308, rng.random()])
    if kind == 4:
        return rng.choice(["", "x", "crc32", "offer", "hello", "\u00e9\u4e2d", *FIELD_NAMES])
    if kind == 5:
        return rng.randbytes(rng.randrange(6))
    if kind == 6:
        return msgpack.ExtType(rng.randrange(128), rng.randbytes(2))
    if kind in (7, 8):
        return rng.randrange(-(2**63), 2**64)
    if kind in (9, 10):
        return {random_key(rng): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def random_key(rng: random.Random) -> Any:
    r = rng.random()
    return rng.choice(FIELD_NAMES) if r < 0.6 else rng.randbytes(2) if r < 0.7 else "k" + str(rng.randrange(9))


def decode_or_refuse(data: bytes) -> None:
    try:
        msg, mid = decode(data)
    except RemoteProtocolError:
        return
    assert isinstance(msg, Message) and type(mid) is int
    assert decode(encode(msg, mid)) == (msg, mid)  # whatever is accepted re-encodes to the same thing


@settings(PROPS, max_examples=1500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    decode_or_refuse(data)


@settings(PROPS, max_examples=1000)
@given(seeds, st.sampled_from(sorted(MESSAGE_TYPES)), st.booleans())
def test_arbitrary_maps(seed: int, mtype: str, typed: bool) -> None:
    rng = random.Random(seed)
    body = {random_key(rng): random_value(rng) for _ in range(rng.randrange(10))}
    if typed:
        body.update(v=PROTOCOL_VERSION, t=mtype)
    decode_or_refuse(msgpack.packb(body, use_bin_type=True))


@settings(PROPS, max_examples=2000)
@given(seeds, st.sampled_from(sorted(MESSAGE_TYPES)), st.booleans())
def test_mutated_envelopes(seed: int, mtype: str, required_only: bool) -> None:
    rng = random.Random(seed)
    body = msgpack.unpackb(encode(sample(MESSAGE_TYPES[mtype], required_only=required_only)), raw=False)
    for _ in range(rng.randrange(1, 4)):
        op, names = rng.randrange(3), list(body)
        if op == 0 and names:
            del body[rng.choice(names)]
        elif op == 1 and names:
            body[rng.choice(names)] = random_value(rng)
        else:
            body[random_key(rng)] = random_value(rng)
    decode_or_refuse(msgpack.packb(body, use_bin_type=True))


@settings(PROPS, max_examples=1500)
@given(seeds, st.sampled_from(sorted(MESSAGE_TYPES)))
def test_corrupted_envelope_bytes(seed: int, mtype: str) -> None:
    rng = random.Random(seed)
    raw = bytearray(encode(sample(MESSAGE_TYPES[mtype])))
    for _ in range(rng.randrange(1, 5)):
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    decode_or_refuse(bytes(raw[: rng.randrange(len(raw) + 1)]))


def test_a_field_at_its_default_is_left_out_so_an_older_peer_accepts_the_message() -> None:
    hello = Hello(role="site", name="s", session="x")
    body = msgpack.unpackb(encode(hello), raw=False)
    assert "holds" not in body and "caps" not in body  # what a peer that predates `holds` would refuse
    assert decode(encode(hello))[0] == hello
    held = Hello(role="site", name="s", session="x", holds=["0-s-1.e"])
    assert msgpack.unpackb(encode(held), raw=False)["holds"] == ["0-s-1.e"]
    assert decode(encode(held))[0] == held
    assert msgpack.unpackb(encode(Chunk(sid=0, off=0, sum=0)), raw=False)["off"] == 0  # required: always sent
