"""fedbus.modelio.serde: bit-exact safetensors layouts without copies, hostile headers, views of one buffer."""

from __future__ import annotations

import copy
import json
import os
import random
import struct
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedbus import digest
from fedbus.errors import ConfigError, HeaderError, LocalProtocolError, RemoteProtocolError
from fedbus.modelio import serde

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
BIG = 1 << 40


def mixed_state_dict() -> dict[str, torch.Tensor]:
    """All ten dtypes (two names each, to pin the name order), a scalar, empty and transposed tensors."""
    gen = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    for name, dtype in serde.DTYPES.items():
        for j, shape in enumerate([(3, 5), (7,)]):
            if dtype.is_floating_point:
                t = torch.randn(shape, generator=gen).to(dtype)
            elif dtype is torch.bool:
                t = torch.randint(0, 2, shape, generator=gen).bool()
            else:
                t = torch.randint(-100 if dtype.is_signed else 0, 100, shape, generator=gen).to(dtype)
            sd[f"{name.lower()}.{1 - j}"] = t
    sd["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    sd["empty"] = torch.empty(0, 4, dtype=torch.int16)
    sd["empty_f32"] = torch.empty(3, 0)
    sd["transposed"] = torch.randn(4, 6, generator=gen).t()
    sd["sliced"] = torch.arange(40, dtype=torch.int32).view(4, 10)[:, 1:7]
    sd['odd\n\t"\\\x01\x7f é 😀'] = torch.ones(3, dtype=torch.bfloat16)
    return sd


def contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in sd.items()}


def joined(lay: serde.Layout) -> bytes:
    return b"".join(bytes(p) for p in lay.parts)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


# --- layout: bit-exact, zero-copy --------------------------------------------------------------------------


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {}, {"ünïcode\n": "välue\x02"}])
def test_layout_is_bit_exact_with_safetensors(metadata: dict[str, str] | None) -> None:
    sd = mixed_state_dict()
    lay = serde.layout(sd, metadata)
    expected = safetensors.torch.save(contiguous(sd), metadata)
    assert joined(lay) == expected
    assert lay.total == len(expected)
    assert bytes(lay.parts[0]) == lay.header == expected[: lay.data_start]
    assert lay.metadata == (metadata or {})
    assert len(lay.parts) == 1 + len(sd)
    assert [s.name for s in lay.specs][:4] == ["i64.0", "i64.1", "f64.0", "f64.1"]


def test_layout_bit_exact_for_empty_and_single_tensor_dicts() -> None:
    assert serde.save_bytes({}) == safetensors.torch.save({})
    assert serde.save_bytes({}, {"a": "b"}) == safetensors.torch.save({}, {"a": "b"})
    sd = {"w": torch.arange(6.0).view(2, 3)}
    assert serde.save_bytes(sd) == safetensors.torch.save(sd)
    # safetensors 0.8 writes invalid JSON here ('{},"__metadata__":{}}'); ours is the obvious header.
    assert serde.load_bytes(serde.save_bytes({}, {})) == {}


def test_metadata_with_several_keys_is_written_sorted() -> None:
    """safetensors writes metadata in hash order (varies per run), so compare meaning, not bytes."""
    sd = {"b": torch.ones(3), "a": torch.zeros(2, dtype=torch.int64)}
    meta = {"z": "1", "a": "2", "m": "3"}
    ours, theirs = serde.save_bytes(sd, meta), safetensors.torch.save(sd, meta)
    assert len(ours) == len(theirs)
    n = int.from_bytes(ours[:8], "little")
    assert ours[n + 8 :] == theirs[n + 8 :]
    assert json.loads(ours[8 : n + 8]) == json.loads(theirs[8 : n + 8])
    assert list(json.loads(ours[8 : n + 8])["__metadata__"]) == ["a", "m", "z"]
    assert_same(safetensors.torch.load(ours), sd)


def test_round_trip_through_one_buffer_gives_views_of_it() -> None:
    sd = mixed_state_dict()
    lay = serde.layout(sd, {"round": "3"})
    buf = serde.allocate(lay.total)
    view = buf.numpy()
    pos = 0
    for part in lay.parts:
        view[pos : pos + part.nbytes] = np.frombuffer(part, dtype=np.uint8)
        pos += part.nbytes
    data_start, specs, metadata = serde.parse_header(view, max_total=lay.total, total=lay.total)
    assert (data_start, specs, metadata) == (lay.data_start, list(lay.specs), {"round": "3"})
    out = serde.tensors_from_buffer(buf, specs, data_start)
    assert_same(out, sd)
    lo, hi = buf.data_ptr(), buf.data_ptr() + lay.total
    for name, t in out.items():
        assert t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr(), name
        assert t.numel() == 0 or lo <= t.data_ptr() < hi, name  # torch reports 0 for empty tensors
    buf[data_start:] = 0  # they are views: zeroing the buffer zeroes them
    assert not any(bool(t.any()) for t in out.values())


def _address(part: memoryview) -> int:
    return np.frombuffer(part, dtype=np.uint8).ctypes.data


@pytest.mark.parametrize("dtype", list(serde.DTYPES.values()))
def test_contiguous_tensors_are_streamed_from_their_own_memory(dtype: torch.dtype) -> None:
    t = torch.zeros(4, 4, dtype=dtype)
    lay = serde.layout({"w": t, "scalar": torch.zeros((), dtype=dtype)})
    part = lay.parts[1 + [s.name for s in lay.specs].index("w")]
    assert part.readonly
    assert _address(part) == t.data_ptr()
    t[1, 2] = 1
    assert bytes(part) == t.view(torch.uint8).numpy().tobytes()
    assert any(part)


def test_parameters_and_slices_are_zero_copy_too() -> None:
    p = torch.nn.Parameter(torch.randn(5, 3))
    row = torch.arange(30.0).view(3, 10)[1]  # contiguous, at a storage offset
    lay = serde.layout({"p": p, "row": row})
    parts = dict(zip([s.name for s in lay.specs], lay.parts[1:], strict=True))
    assert _address(parts["p"]) == p.data_ptr()
    assert _address(parts["row"]) == row.data_ptr()
    assert parts["row"].nbytes == 40


def test_non_contiguous_tensors_are_copied_once() -> None:
    t = torch.randn(4, 6)
    lay = serde.layout({"t": t.t()})
    part = lay.parts[1]
    assert bytes(part) == t.t().contiguous().numpy().tobytes()
    t[0, 0] = 123.0
    assert _address(part) != t.data_ptr()
    assert bytes(part) != t.t().contiguous().numpy().tobytes()


def test_tensors_sharing_storage_are_each_their_own_bytes() -> None:
    """safetensors refuses shared tensors (tied weights); we write each one, reading the same memory."""
    tied = torch.randn(4, 3)
    sd = {"embed": tied, "lm_head": tied, "tail": tied[1:]}
    with pytest.raises(RuntimeError, match="share memory"):
        safetensors.torch.save(sd)
    lay = serde.layout(sd)
    parts = dict(zip([s.name for s in lay.specs], lay.parts[1:], strict=True))
    assert _address(parts["embed"]) == _address(parts["lm_head"]) == tied.data_ptr()
    data = joined(lay)
    assert_same(serde.load_bytes(data), sd)
    assert_same(safetensors.torch.load(data), sd)


def test_digest_of_a_layout_is_the_digest_of_its_file() -> None:
    sd = mixed_state_dict()
    lay = serde.layout(sd)
    for chunk in (8, 40, 64, 1000):
        assert digest.chunk_sums(lay.parts, chunk) == digest.chunk_sums([joined(lay)], chunk)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_are_copied_to_host() -> None:
    sd = {"w": torch.randn(3, 4, device="cuda"), "t": torch.randn(4, 3, device="cuda").t()}
    cpu = {k: v.cpu() for k, v in sd.items()}
    assert joined(serde.layout(sd)) == safetensors.torch.save(contiguous(cpu))


@pytest.mark.parametrize(
    ("state_dict", "metadata", "fragment"),
    [
        ({1: torch.ones(1)}, None, "tensor name 1"),
        ({"": torch.ones(1)}, None, "non-empty"),
        ({"__metadata__": torch.ones(1)}, None, "__metadata__"),
        ({"bad\ud800": torch.ones(1)}, None, "UTF-8"),
        ({"w": [1.0, 2.0]}, None, "'w' is a list"),
        ({"c": torch.ones(2, dtype=torch.complex64)}, None, "'c' has dtype torch.complex64"),
        ({"u": torch.ones(2, dtype=torch.uint32)}, None, "'u' has dtype torch.uint32"),
        ({"s": torch.eye(3).to_sparse()}, None, "'s' is torch.sparse_coo"),
        ({"m": torch.empty(3, device="meta")}, None, "'m' is on the meta device"),
        ({"w": torch.ones(1)}, {"k": 1}, "metadata entry 'k'"),
        ({"w": torch.ones(1)}, [("k", "v")], "metadata must be a dict"),
        ([("w", torch.ones(1))], None, "state_dict must be a mapping"),
    ],
)
def test_layout_rejects_what_it_cannot_stream(state_dict: Any, metadata: Any, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        serde.layout(state_dict, metadata)
    assert fragment in str(info.value)


# --- parse_header: untrusted input -------------------------------------------------------------------------


def header(obj: Any, *, pad: bool = True, raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(obj, separators=(",", ":")).encode()
    if pad:
        body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def entry(dtype: str = "F32", shape: list[Any] | None = None, offsets: list[Any] | None = None) -> dict[str, Any]:
    return {"dtype": dtype, "shape": [2] if shape is None else shape, "data_offsets": offsets or [0, 8]}


def with_data(hdr: bytes, nbytes: int) -> bytes:
    return hdr + bytes(nbytes)


GOOD = {"w": entry()}

MALFORMED: list[tuple[str, bytes, dict[str, Any], str]] = [
    ("empty", b"", {}, "shorter than the 8-byte"),
    ("prefix only partly", b"\x08\x00\x00", {}, "shorter than the 8-byte"),
    ("huge length", struct.pack("<Q", 2**63) + b"{}", {}, "exceeds the"),
    ("length past data", struct.pack("<Q", 64) + b"{}      ", {}, "runs past"),
    ("length not 8-aligned", header(None, raw=b"{} ", pad=False), {}, "multiple of 8"),
    ("bad utf-8", header(None, raw=b'{"\xff":1}'), {}, "UTF-8"),
    ("not json", header(None, raw=b"{'w': 1}"), {}, "not valid JSON"),
    ("json array", header([1, 2]), {}, "must be a JSON object"),
    ("json string", header("x"), {}, "must be a JSON object"),
    ("trailing garbage", header(None, raw=b"{}{}"), {}, "not valid JSON"),
    ("duplicate name", header(None, raw=b'{"w":1,"w":2}'), {}, "repeats the key 'w'"),
    ("NaN", header(None, raw=b'{"w":NaN}'), {}, "non-JSON number NaN"),
    ("huge int literal", header(None, raw=b'{"w":' + b"9" * 5000 + b"}"), {}, "not valid JSON"),
    ("deep nesting", header(None, raw=b'{"w":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), {}, "not valid JSON"),
    ("metadata not object", header({"__metadata__": ["a"]}), {}, "__metadata__ must be"),
    ("metadata null", header({"__metadata__": None}), {}, "__metadata__ must be"),
    ("metadata int value", header({"__metadata__": {"a": 1}}), {}, "__metadata__ must be"),
    ("metadata surrogate", header(None, raw=b'{"__metadata__":{"a":"\\ud800"}}'), {}, "__metadata__ must be"),
    ("empty name", header({"": entry()}), {}, "empty name"),
    ("surrogate name", header(None, raw=b'{"\\udc00":{}}'), {}, "not valid UTF-8"),
    ("entry not object", header({"w": [1]}), {}, "tensor 'w': entry must be an object"),
    ("missing shape", header({"w": {"dtype": "F32", "data_offsets": [0, 0]}}), {}, "tensor 'w'"),
    ("extra key", header({"w": {**entry(), "x": 1}}), {}, "extra [\"'x'\"]"),
    ("unknown dtype", header({"w": entry("F8_E4M3")}), {}, "tensor 'w': unsupported dtype 'F8_E4M3'"),
    ("dtype not str", header({"w": entry(4)}), {}, "unsupported dtype 4"),  # type: ignore[arg-type]
    ("shape not list", header({"w": entry(shape=2)}), {}, "tensor 'w': shape must be"),  # type: ignore[arg-type]
    ("negative dim", header({"w": entry(shape=[-2])}), {}, "tensor 'w': shape must be"),
    ("bool dim", header({"w": entry(shape=[True, 2])}), {}, "tensor 'w': shape must be"),
    ("float dim", header({"w": entry(shape=[2.0])}), {}, "tensor 'w': shape must be"),
    ("too many dims", header({"w": entry(shape=[1] * 65, offsets=[0, 4])}), {}, "shape must be"),
    ("huge dims", header({"w": entry(shape=[2**40, 2**40], offsets=[0, 4])}), {}, "'w': shape [1099511627776"),
    ("huge dims, one zero", header({"w": entry(shape=[0, 2**40, 2**40], offsets=[0, 0])}), {}, "too large"),
    ("one offset", header({"w": entry(offsets=[8])}), {}, "tensor 'w': data_offsets must be two"),
    ("three offsets", header({"w": entry(offsets=[0, 4, 8])}), {}, "data_offsets must be two"),
    ("bool offset", header({"w": entry(offsets=[False, 8])}), {}, "data_offsets must be two"),
    ("negative offset", header({"w": entry(offsets=[-8, 0])}), {}, "data_offsets must be two"),
    ("offsets reversed", header({"w": entry(offsets=[8, 0])}), {}, "end 0 is before start 8"),
    (
        "size mismatch",
        header({"w": entry(shape=[3])}),
        {},
        "'w': shape [3] of F32 needs 12 bytes but data_offsets span 8",
    ),
    ("overflowing size", header({"w": entry("I64", [2**47, 2**1], [0, 8])}), {}, "'w': shape"),
    (
        "misaligned",
        header({"a": entry("U8", [2], [0, 2]), "w": entry(offsets=[2, 10])}),
        {},
        "'w': offset 2 is not aligned",
    ),
    ("gap at start", header({"w": entry(offsets=[8, 16])}), {}, "'w' starts at 8, leaving a gap after 0"),
    ("gap between", header({"a": entry(), "w": entry(offsets=[16, 24])}), {}, "'w' starts at 16"),
    ("overlap", header({"a": entry(), "w": entry(shape=[4], offsets=[4, 20])}), {}, "'w' at [4, 20) overlaps"),
    ("same range twice", header({"a": entry(), "w": entry()}), {}, "overlaps"),
    ("total too short", header(GOOD), {"total": 100}, "tensors end at byte"),
    ("total too long", with_data(header(GOOD), 8), {"total": len(header(GOOD)) + 16}, "tensors end at byte"),
    ("total below header", header(GOOD), {"total": 10}, "cannot hold"),
    ("total not int", header(GOOD), {"total": 1.5}, "cannot hold"),
    ("total over cap", header(GOOD), {"total": 10_000, "max_total": 1000}, "exceeds the 1000-byte cap"),
    ("tensors over cap", header(GOOD), {"max_total": 50}, "over the 50-byte cap"),
]


@pytest.mark.parametrize(("data", "kwargs", "fragment"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_headers_are_refused_with_a_reason(data: bytes, kwargs: dict[str, Any], fragment: str) -> None:
    kwargs = {"max_total": BIG, **kwargs}
    with pytest.raises(HeaderError) as info:
        serde.parse_header(data, **kwargs)
    assert fragment in str(info.value)


def test_a_well_formed_header_passes() -> None:
    hdr = header(
        {"__metadata__": {"k": "v"}, "b": entry("U8", [3], [8, 11]), "a": entry(), "z": entry("U8", [0, 3], [11, 11])}
    )
    data_start, specs, metadata = serde.parse_header(hdr, max_total=BIG, total=len(hdr) + 11)
    assert data_start == len(hdr)
    assert [(s.name, s.start, s.end) for s in specs] == [("a", 0, 8), ("b", 8, 11), ("z", 11, 11)]
    assert metadata == {"k": "v"}
    assert specs[2].shape == (0, 3) and specs[1].nbytes == 3


# Hypothesis: safetensors-written headers always pass; mutated ones fail only with HeaderError.

NAMES = st.text(min_size=1, max_size=6).filter(lambda s: s != "__metadata__")
SHAPES = st.lists(st.integers(0, 3), max_size=3).map(tuple)


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(st.lists(NAMES, max_size=6, unique=True))
    return {
        n: torch.zeros(draw(SHAPES), dtype=serde.DTYPES[draw(st.sampled_from(sorted(serde.DTYPES)))]) for n in names
    }


METADATA = st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=1)


@settings(FUZZ, max_examples=100)
@given(state_dicts(), METADATA)
def test_headers_written_by_safetensors_always_pass(
    sd: dict[str, torch.Tensor], metadata: dict[str, str] | None
) -> None:
    assume(sd or metadata != {})  # safetensors 0.8 writes invalid JSON for ({}, {})
    data = safetensors.torch.save(sd, metadata)
    data_start, specs, meta = serde.parse_header(data, max_total=len(data), total=len(data))
    lay = serde.layout(sd, metadata)
    assert joined(lay) == data
    assert (data_start, specs, meta) == (lay.data_start, list(lay.specs), metadata or {})
    assert_same(serde.load_bytes(data), sd)


def _valid_file() -> bytes:
    return serde.save_bytes(
        {"w": torch.ones(2, 3), "b": torch.ones(3, dtype=torch.float16), "n": torch.zeros(2, dtype=torch.bool)},
        {"k": "v"},
    )


VALID = _valid_file()


def _check_parse(data: bytes, total: int | None, max_total: int) -> None:
    try:
        data_start, specs, _ = serde.parse_header(data, max_total=max_total, total=total)
    except HeaderError:
        return
    pos = 0  # what passed must be sound
    for s in specs:
        assert s.start == pos and s.end - s.start == int(np.prod(s.shape)) * serde.ITEMSIZE[s.dtype]
        assert s.start % serde.ITEMSIZE[s.dtype] == 0
        pos = s.end
    assert data_start % 8 == 0 and data_start + pos <= max_total
    assert total is None or data_start + pos == total


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(["flip", "set", "insert", "delete"]), st.integers(0, 200), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
    st.integers(0, 2 * len(VALID)),
)
def test_mutated_bytes_fail_only_with_header_error(
    mutations: list[tuple[str, int, int]], fix_length: bool, max_total: int
) -> None:
    data = bytearray(VALID)
    for op, pos, value in mutations:
        pos %= len(data) + 1
        if op == "flip" and pos < len(data):
            data[pos] ^= 1 << (value % 8)
        elif op == "set" and pos < len(data):
            data[pos] = value
        elif op == "insert":
            data[pos:pos] = bytes([value])
        elif op == "delete" and pos < len(data):
            del data[pos]
    if fix_length and len(data) >= 8:
        data[:8] = struct.pack("<Q", len(data) - 8 - 7)  # keep a plausible length in front of the JSON
    _check_parse(bytes(data), len(data), max_total)
    _check_parse(bytes(data), None, max_total)


# st.deferred rather than st.recursive: see _toml_values in tests/test_jobs.py.
JSON: st.SearchStrategy = st.deferred(
    lambda: (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats()
        | st.text(max_size=4)
        | st.lists(JSON, max_size=3)
        | st.dictionaries(st.text(max_size=4), JSON, max_size=3)
    )
)
FIELDS = st.sampled_from(["dtype", "shape", "data_offsets", "extra"])


@settings(FUZZ, max_examples=100)
@given(
    st.lists(st.tuples(st.sampled_from(["w", "b", "n", "__metadata__", "new"]), FIELDS, JSON), min_size=1, max_size=3),
    st.lists(st.tuples(st.sampled_from(["w", "b", "n"]), st.integers(-9, 9), st.integers(0, 1)), max_size=2),
)
def test_mutated_json_fails_only_with_header_error(
    replacements: list[tuple[str, str, Any]], shifts: list[tuple[str, int, int]]
) -> None:
    n = int.from_bytes(VALID[:8], "little")
    obj = json.loads(VALID[8 : 8 + n])
    for name, key, value in replacements:
        target = obj.setdefault(name, {})
        if isinstance(target, dict):
            target[key] = value
        else:
            obj[name] = value
    for name, delta, which in shifts:
        offsets = obj.get(name, {}).get("data_offsets") if isinstance(obj.get(name), dict) else None
        if isinstance(offsets, list) and len(offsets) == 2 and isinstance(offsets[which], int):
            offsets[which] += delta
    hdr = header(obj)
    data = hdr + VALID[8 + n :]
    _check_parse(data, len(data), BIG)
    _check_parse(hdr, None, BIG)


@settings(FUZZ, max_examples=100)
@given(st.dictionaries(st.text(max_size=6), JSON, max_size=4) | JSON)
def test_arbitrary_json_fails_only_with_header_error(obj: Any) -> None:
    _check_parse(header(obj), None, BIG)


NASTY_SCALARS = [None, True, 0, -1, 3, 2**64, 10**30, 1.5, float("inf"), "", "F32", "I64", "BOOL"]
NASTY_LISTS = [[], {}, [0], [0, 8], [8, 0], [0, 24], [1, 2, 3], [2**40] * 3, [0, 2**63], ["a"], [True, 1]]
NASTY = [*NASTY_SCALARS, *NASTY_LISTS, {"dtype": "F32"}]


def test_thousands_of_seeded_mutations_fail_only_with_header_error() -> None:
    """Cheap volume to complement the shrinking fuzzers above: 6000 mutated headers, same invariants."""
    rng = random.Random(1234)
    n = int.from_bytes(VALID[:8], "little")
    base = json.loads(VALID[8 : 8 + n])
    for _ in range(3000):
        data = bytearray(VALID)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(min(len(data), 8 + n + 8))
            if rng.random() < 0.7:
                data[pos] ^= 1 << rng.randrange(8)
            else:
                data[pos : pos + rng.randint(0, 3)] = rng.randbytes(rng.randint(0, 3))
        _check_parse(bytes(data), len(data), BIG)
    for _ in range(3000):
        obj = json.loads(json.dumps(base))
        for _ in range(rng.randint(1, 3)):
            name = rng.choice(["w", "b", "n", "__metadata__", "x"])
            value = copy.deepcopy(rng.choice(NASTY))
            if isinstance(obj.get(name), dict) and rng.random() < 0.8:
                obj[name][rng.choice(["dtype", "shape", "data_offsets", "k", "extra"])] = value
            else:
                obj[name] = value
        data = header(obj) + VALID[8 + n :]
        _check_parse(data, len(data), BIG)


# --- receive side ------------------------------------------------------------------------------------------


def test_tensors_from_buffer_checks_its_inputs() -> None:
    data = serde.save_bytes({"flag": torch.tensor([True, False]), "w": torch.ones(2)})
    data_start, specs, _ = serde.parse_header(data, max_total=len(data), total=len(data))
    buf = serde.allocate(len(data))
    buf.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
    assert serde.tensors_from_buffer(buf, specs, data_start)["flag"].tolist() == [True, False]
    buf[-1] = 2  # a BOOL byte that is neither 0 nor 1
    with pytest.raises(RemoteProtocolError, match="'flag': BOOL data"):
        serde.tensors_from_buffer(buf, specs, data_start)
    with pytest.raises(LocalProtocolError, match="past the"):
        serde.tensors_from_buffer(buf[:-4], specs, data_start)
    with pytest.raises(LocalProtocolError, match="uint8"):
        serde.tensors_from_buffer(buf.view(torch.int8), specs, data_start)
    with pytest.raises(LocalProtocolError, match="viewed in place"):
        serde.tensors_from_buffer(serde.allocate(len(data) + 1)[1:], specs, data_start)
    with pytest.raises(LocalProtocolError):
        serde.allocate(-1)


def test_load_bytes_copies_once_and_accepts_memoryviews() -> None:
    sd = mixed_state_dict()
    data = bytearray(serde.save_bytes(sd))
    out = serde.load_bytes(memoryview(data))
    data[-1] ^= 1  # the result does not alias the input
    assert_same(out, sd)
    with pytest.raises(HeaderError, match="tensors end at byte"):
        serde.load_bytes(bytes(data) + b"\0")
    with pytest.raises(HeaderError, match="exceeds"):
        serde.load_bytes(bytes(data), max_total=100)


def test_check_compatible_names_every_difference() -> None:
    ref = {"w": torch.ones(2, 3), "b": torch.ones(3), "gone": torch.ones(1)}
    serde.check_compatible(ref, serde.layout(ref).specs)
    serde.check_compatible(serde.layout(ref), ref)
    update = {"w": torch.ones(3, 2), "b": torch.ones(3, dtype=torch.float16), "new": torch.ones(1)}
    with pytest.raises(HeaderError) as info:
        serde.check_compatible(ref, list(serde.layout(update).specs))
    message = str(info.value)
    for fragment in (
        "missing 'gone'",
        "unexpected 'new'",
        "'w' has shape [3, 2], expected [2, 3]",
        "'b' has dtype F16, expected F32",
    ):
        assert fragment in message


# --- files -------------------------------------------------------------------------------------------------


def test_write_file_then_read_file(tmp_path: Any) -> None:
    sd = mixed_state_dict()
    path = tmp_path / "model.safetensors"
    serde.write_file(path, serde.layout(sd, {"version": "7"}))
    assert path.read_bytes() == safetensors.torch.save(contiguous(sd), {"version": "7"})
    assert_same(serde.read_file(path), sd)
    assert_same(safetensors.torch.load_file(path), sd)
    serde.write_file(path, {"x": torch.arange(3)})  # replaces atomically; a state_dict is fine too
    assert_same(serde.read_file(path), {"x": torch.arange(3)})
    assert os.listdir(tmp_path) == ["model.safetensors"]
    with pytest.raises(HeaderError, match="exceeds"):
        serde.read_file(path, max_total=10)
    (tmp_path / "bad").write_bytes(b"\x08" + bytes(7) + b"[]      ")
    with pytest.raises(HeaderError, match="JSON object"):
        serde.read_file(tmp_path / "bad")


def test_map_file_hands_out_views_of_the_file_and_refuses_what_is_not_one(tmp_path: Any) -> None:
    sd = mixed_state_dict()
    path = tmp_path / "model.safetensors"
    serde.write_file(path, serde.layout(sd))
    mapped, mem = serde.map_file(path)
    assert_same(mapped, sd)
    mapped["f32.0"].add_(1)  # a write to a tensor is a write to the file
    assert torch.equal(serde.read_file(path)["f32.0"], sd["f32.0"] + 1)
    assert len({t.untyped_storage().data_ptr() for t in mapped.values()}) == 1  # views of one mapping
    del mapped, mem
    with pytest.raises(HeaderError, match="exceeds"):
        serde.map_file(path, max_total=10)
    (tmp_path / "short").write_bytes(b"\x08")
    with pytest.raises(HeaderError, match="too short"):
        serde.map_file(tmp_path / "short")
    (tmp_path / "bad").write_bytes(b"\x08" + bytes(7) + b"[]      ")
    with pytest.raises(HeaderError, match="JSON object"):
        serde.map_file(tmp_path / "bad")
    os.symlink(path, tmp_path / "link")
    with pytest.raises(OSError):
        serde.map_file(tmp_path / "link")  # a planted symlink is not followed


def test_write_file_survives_short_writes(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, bufs: real(fd, [memoryview(bufs[0])[:5]]))
    sd = mixed_state_dict()
    serde.write_file(tmp_path / "m", serde.layout(sd))
    assert (tmp_path / "m").read_bytes() == safetensors.torch.save(contiguous(sd))


def test_write_file_leaves_the_old_file_when_it_fails(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m"
    path.write_bytes(b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk gone"):
        serde.write_file(path, {"w": torch.ones(2)})
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["m"]


def test_write_file_copies_strided_tensors_straight_into_the_file(tmp_path) -> None:
    """Strided (and device) tensors take the mapped path: one copy each into the file, bit-exact with safetensors."""
    base = torch.arange(60, dtype=torch.float32).view(6, 10)
    model = {"t": base.t(), "s": base[:, ::3], "b": torch.tensor([True, False]), "e": torch.empty(0, 3)}
    assert not model["t"].is_contiguous()
    path = tmp_path / "m.safetensors"
    serde.write_file(path, model, durable=False)
    assert path.read_bytes() == safetensors.torch.save({k: v.contiguous() for k, v in model.items()})
    back = serde.read_file(path)
    assert all(torch.equal(back[k], v) for k, v in model.items())


def test_huge_page_receive_buffer_is_its_own_mapping_and_outlives_its_name() -> None:
    """With ``huge`` (placement threads on) a buffer of HUGE_BUFFER_MIN bytes or more is an anonymous mapping
    advised to huge pages; tensors viewing it keep it alive after every name of the buffer is gone."""
    import gc

    from fedbus.modelio.buffers import HUGE_BUFFER_MIN

    buf = serde.allocate(HUGE_BUFFER_MIN, huge=True)
    assert buf.numel() == HUGE_BUFFER_MIN and buf.dtype is torch.uint8
    model = {"w": torch.arange(HUGE_BUFFER_MIN // 8, dtype=torch.float32)}
    data = serde.save_bytes(model)
    buf = serde.allocate(len(data), huge=True)
    buf.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
    start, specs, _ = serde.parse_header(data[: 8 + int.from_bytes(data[:8], "little")], max_total=len(data))
    tensors = serde.tensors_from_buffer(buf, specs, start)
    del buf
    gc.collect()
    assert torch.equal(tensors["w"], model["w"])
    assert serde.allocate(16, huge=True).numel() == 16  # small buffers stay plain memory


def test_populating_a_fresh_buffer_for_writing_keeps_its_bytes_writable() -> None:
    """Any range, page-aligned or not (rounded out to whole pages of the buffer); an empty one is a no-op."""
    from fedbus._memory import populate_for_write

    buf = torch.empty(5 << 20, dtype=torch.uint8)
    assert populate_for_write(buf.data_ptr() + 1234, 3 << 20)
    assert populate_for_write(buf.data_ptr(), 0)
    buf.fill_(7)
    assert int(buf.sum()) == 7 * (5 << 20)


def test_the_cached_header_parse_answers_as_the_parse_does_and_never_remembers_a_refusal() -> None:
    lay = serde.layout({"w": torch.randn(4, 3), "b": torch.zeros(3, dtype=torch.int64)})
    header = bytes(lay.header)
    first = serde.parse_header_cached(bytes(header), max_total=1 << 20, total=lay.total)
    again = serde.parse_header_cached(bytes(header), max_total=1 << 20, total=lay.total)
    assert first == again == serde.parse_header(header, max_total=1 << 20, total=lay.total)
    first[1].clear()  # each caller owns its list (and dict): a change does not reach the next one
    first[2]["x"] = "y"
    assert serde.parse_header_cached(header, max_total=1 << 20, total=lay.total) == again
    for _ in range(2):  # the same header with a wrong total, or over the cap, is refused each time
        with pytest.raises(serde.HeaderError):
            serde.parse_header_cached(header, max_total=1 << 20, total=lay.total + 1)
        with pytest.raises(serde.HeaderError):
            serde.parse_header_cached(header, max_total=16, total=lay.total)
