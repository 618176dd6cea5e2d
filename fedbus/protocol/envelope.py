"""The envelope codec: a message <-> one small msgpack map, validated strictly on the way in.

Wire form: ``{"v": PROTOCOL_VERSION, "t": TYPE, "id": message id, **fields}``. Decoding trusts nothing:
size cap first, then msgpack with its own container limits, then version, known type, every required
field present, no unknown field, every value of its declared type (nested dict/list values plain and
bounded). Any failure is a ``RemoteProtocolError`` that names the type and field at fault.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from fedbus.errors import LocalProtocolError, RemoteProtocolError
from fedbus.protocol.messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message

MAX_ENVELOPE = 256 * 1024
"""Largest envelope accepted (bytes), but for an offer. Payloads never travel here."""

MAX_OFFER_ENVELOPE = 16 << 20
"""Largest offer accepted (bytes). An offer carries the model's safetensors header, ~85 bytes per tensor: a
4 GiB model of 4,200 tensors has a 360 KB header (more than MAX_ENVELOPE), 16 MiB fits ~190,000 tensors."""

MAX_DEPTH = 8
"""Deepest nesting accepted inside dict/list fields (metrics, meta, config)."""

_PLAIN = (int, float, str, bytes, bool, type(None))
_LEAVES = frozenset({int, str, bytes, bool, type(None)})  # exactly these need no check inside a dict or list
_SCALARS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (float, int),
    "str": (str,),
    "bytes": (bytes,),
    "bool": (bool,),
    "dict": (dict,),
    "list": (list,),
}


_REQUIRED = object()


@dataclasses.dataclass(frozen=True, slots=True)
class _Field:
    name: str
    kinds: tuple[type, ...]
    optional: bool
    required: bool
    spec: str
    simple: frozenset[type]
    """Exact types that need no further check (no NaN, nothing nested): most values take this one test."""
    default: Any
    """The value a missing field takes (``_REQUIRED`` if none); a field at its default is not sent."""


def _schema(cls: type[Message]) -> tuple[_Field, ...]:
    """Turn a message class's annotations (strings, thanks to PEP 563) into checkable field specs."""
    out = []
    for f in dataclasses.fields(cls):
        spec = str(f.type).replace(" ", "")
        parts = spec.split("|")
        optional = "None" in parts
        kinds: tuple[type, ...] = ()
        for p in parts:
            if p != "None":
                kinds += _SCALARS[p]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        simple = frozenset(k for k in kinds if k in (int, str, bytes, bool))  # not float (NaN), dict or list
        if required:
            default: Any = _REQUIRED
        else:
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        out.append(_Field(f.name, kinds, optional, required, spec, simple, default))
    return tuple(out)


_SCHEMAS = {t: _schema(cls) for t, cls in MESSAGE_TYPES.items()}


def encode(msg: Message, mid: int = 0) -> bytes:
    """Serialize ``msg`` into one envelope frame."""
    cls = MESSAGE_TYPES.get(msg.TYPE)
    if cls is not type(msg):
        raise LocalProtocolError(f"not a registered message: {type(msg).__name__}")
    body = {"v": PROTOCOL_VERSION, "t": msg.TYPE, "id": mid}
    try:  # what we send must pass the checks the peer will apply: fail here, naming the field, not there
        for f in _SCHEMAS[msg.TYPE]:
            value = getattr(msg, f.name)
            if type(value) not in f.simple:  # an int, str, bytes or bool of a field that takes it needs no more
                _check_field(msg.TYPE, f, value)
            # A field at its default is left out: the peer fills in the same, and one that predates it accepts it.
            if f.required or type(value) is not type(f.default) or value != f.default:
                body[f.name] = value
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"cannot send: {exc}") from None
    try:
        data = msgpack.packb(body, use_bin_type=True)
    except (OverflowError, ValueError) as exc:  # an int beyond 64 bits, a nest too deep for msgpack
        raise LocalProtocolError(f"cannot send {msg.TYPE}: {exc}") from None
    if len(data) > _limit(msg.TYPE, MAX_ENVELOPE):
        raise LocalProtocolError(f"cannot send {msg.TYPE}: envelope of {len(data)} bytes exceeds the limit")
    return data


def _limit(mtype: object, max_size: int) -> int:
    return max(max_size, MAX_OFFER_ENVELOPE) if mtype == "offer" else max_size


def decode(data: bytes | bytearray | memoryview, max_size: int = MAX_ENVELOPE) -> tuple[Message, int]:
    """Parse and validate one untrusted envelope frame; returns (message, message id)."""
    size = memoryview(data).nbytes
    if size > _limit("offer", max_size):
        raise RemoteProtocolError(f"envelope of {size} bytes exceeds the {max_size}-byte limit")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many unrelated types for garbage
        raise RemoteProtocolError(f"envelope is not valid msgpack: {type(exc).__name__}") from exc
    if not isinstance(body, dict):
        raise RemoteProtocolError(f"envelope must be a map, got {type(body).__name__}")
    version = body.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(f"unsupported protocol version {version!r} (this side speaks {PROTOCOL_VERSION})")
    mtype = body.pop("t", None)
    if not isinstance(mtype, str) or mtype not in _SCHEMAS:
        raise RemoteProtocolError(f"unknown message type {mtype!r}")
    if size > _limit(mtype, max_size):
        raise RemoteProtocolError(f"{mtype}: envelope of {size} bytes exceeds the {max_size}-byte limit")
    mid = body.pop("id", 0)
    if type(mid) is not int:
        raise RemoteProtocolError(f"{mtype}: field 'id' must be int")
    kwargs: dict[str, Any] = {}
    for f in _SCHEMAS[mtype]:
        if f.name not in body:
            if f.required:
                raise RemoteProtocolError(f"{mtype}: missing field {f.name!r}")
            continue
        value = body.pop(f.name)
        if type(value) not in f.simple:  # the check's own fast path, without the call
            _check_field(mtype, f, value)
        kwargs[f.name] = value
    if body:
        raise RemoteProtocolError(f"{mtype}: unknown field(s) {sorted(map(str, body))}")
    return MESSAGE_TYPES[mtype](**kwargs), mid


def _check_field(mtype: str, f: _Field, value: Any) -> None:
    if type(value) in f.simple:  # a bool is never taken for an int here: its type is bool
        return
    if value is None:
        if f.optional:
            return
        raise RemoteProtocolError(f"{mtype}: field {f.name!r} must be {f.spec}, got None")
    # bool is an int subclass: an int field must not accept True, a bool field must not accept 1.
    ok = isinstance(value, f.kinds) and (isinstance(value, bool) == (bool in f.kinds))
    if not ok:
        raise RemoteProtocolError(f"{mtype}: field {f.name!r} must be {f.spec}, got {type(value).__name__}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        _check_number(mtype, f.name, value)
    if isinstance(value, dict | list):
        _check_plain(mtype, f.name, value, 0)


def _check_number(mtype: str, name: str, value: float) -> None:
    if isinstance(value, float) and value != value:  # NaN sneaks past every comparison
        raise RemoteProtocolError(f"{mtype}: field {name!r} is NaN")


def _check_plain(mtype: str, name: str, value: Any, depth: int) -> None:
    """Nested values must be plain msgpack data with string keys, bounded in depth."""
    if depth > MAX_DEPTH:
        raise RemoteProtocolError(f"{mtype}: field {name!r} nests deeper than {MAX_DEPTH}")
    leaf = _LEAVES if depth < MAX_DEPTH else frozenset()  # a leaf one level down is within the depth: no call
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise RemoteProtocolError(f"{mtype}: field {name!r} has a non-string key")
            if type(v) not in leaf:
                _check_plain(mtype, name, v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            if type(v) not in leaf:
                _check_plain(mtype, name, v, depth + 1)
    elif not isinstance(value, _PLAIN):
        raise RemoteProtocolError(f"{mtype}: field {name!r} holds a {type(value).__name__}")
    elif isinstance(value, float):
        _check_number(mtype, name, value)  # NaN nowhere: it equals nothing, not even itself
