"""fedbus.digest: split-independent chunk sums, chunk slicing without copies, stream digests."""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbus import digest
from fedbus.errors import LocalProtocolError

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
MIX = 0x9E3779B97F4A7C15


def ref_sum64(data: bytes) -> int:
    """The definition, written the slow and obvious way."""
    padded = data + b"\0" * (-len(data) % 8)
    words = sum(int.from_bytes(padded[i : i + 8], "little") for i in range(0, len(padded), 8))
    return (words + len(data) * MIX) % 2**64


def ref(data: bytes, alg: str) -> int:
    return ref_sum64(data) if alg == "sum64" else zlib.crc32(data)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@st.composite
def data_and_cuts(draw: st.DrawFn, max_size: int = 300) -> tuple[bytes, list[int]]:
    data = draw(st.binary(max_size=max_size))
    cuts = draw(st.lists(st.integers(0, max_size), max_size=12))
    return data, cuts


# --- chunk_sum ---------------------------------------------------------------------------------------------


def test_known_values() -> None:
    assert digest.chunk_sum([]) == 0
    assert digest.chunk_sum([b""]) == 0
    assert digest.chunk_sum([b"\x01"]) == (1 + MIX) % 2**64
    assert digest.chunk_sum([(2**64 - 1).to_bytes(8, "little"), (1).to_bytes(8, "little")]) == (16 * MIX) % 2**64
    assert digest.DEFAULT_ALG == "sum64"
    assert digest.ALGORITHMS == ("sum64", "crc32")


@FUZZ
@given(data_and_cuts())
def test_sum64_of_any_split_is_sum64_of_the_concatenation(dc: tuple[bytes, list[int]]) -> None:
    data, cuts = dc
    parts = split(data, cuts)
    assert b"".join(parts) == data
    got = digest.chunk_sum(parts)
    assert got == ref_sum64(data)
    assert 0 <= got < 2**64


@FUZZ
@given(st.lists(st.binary(max_size=40).map(lambda b: b[: len(b) // 8 * 8]), max_size=8), st.binary(max_size=20))
def test_sum64_of_word_aligned_parts(aligned: list[bytes], last: bytes) -> None:
    parts = [*aligned, last]
    assert digest.chunk_sum(parts) == ref_sum64(b"".join(parts))


@FUZZ
@given(data_and_cuts())
def test_crc32_is_zlib_crc32_of_the_concatenation(dc: tuple[bytes, list[int]]) -> None:
    data, cuts = dc
    assert digest.chunk_sum(split(data, cuts), "crc32") == zlib.crc32(data)


@pytest.mark.parametrize("alg", digest.ALGORITHMS)
def test_any_buffer_type(alg: str) -> None:
    rng = np.random.default_rng(1)
    arr = rng.standard_normal((5, 7)).astype(np.float32)  # 2-D, 4-byte items: cast to bytes
    raw = arr.tobytes()
    parts = [
        bytes(raw[:13]),
        bytearray(raw[13:40]),
        memoryview(raw[40:64]).toreadonly(),
        np.frombuffer(raw[64:], dtype=np.uint8),
    ]
    assert digest.chunk_sum(parts, alg) == ref(raw, alg)
    assert digest.chunk_sum([arr], alg) == ref(raw, alg)


def test_every_single_bit_flip_changes_the_sum() -> None:
    data = bytearray(np.random.default_rng(2).integers(0, 256, 61, dtype=np.uint8).tobytes())
    for alg in digest.ALGORITHMS:
        base = digest.chunk_sum([data], alg)
        for bit in range(len(data) * 8):
            data[bit // 8] ^= 1 << (bit % 8)
            assert digest.chunk_sum([data], alg) != base, (alg, bit)
            data[bit // 8] ^= 1 << (bit % 8)


@FUZZ
@given(st.integers(0, 8 * (1 << 16) - 1), st.integers(0, 7))
def test_a_bit_flip_anywhere_in_a_large_split_buffer_is_caught(bit: int, cut: int) -> None:
    data = bytearray(1 << 16)
    parts = [memoryview(data)[: 8 * 1000 + cut], memoryview(data)[8 * 1000 + cut :]]
    base = digest.chunk_sum(parts)
    data[bit // 8] ^= 1 << (bit % 8)
    assert digest.chunk_sum(parts) != base


def test_appended_zeros_change_the_sum() -> None:
    assert digest.chunk_sum([b"abc"]) != digest.chunk_sum([b"abc\0"])
    assert digest.chunk_sum([bytes(8)]) != digest.chunk_sum([bytes(16)])


def test_rejects_bad_input() -> None:
    with pytest.raises(LocalProtocolError, match="unknown digest algorithm"):
        digest.chunk_sum([b"x"], "md5")
    with pytest.raises(LocalProtocolError, match="contiguous"):
        digest.chunk_sum([np.arange(16, dtype=np.uint8)[::2]])


# --- chunk slicing -----------------------------------------------------------------------------------------


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if view.nbytes else 0


def test_chunk_parts_are_zero_copy_slices() -> None:
    a = np.arange(100, dtype=np.uint8)
    b = bytearray(range(50))
    pieces = digest.chunk_parts([a, b], 90, 20)
    assert [p.nbytes for p in pieces] == [10, 10]
    assert _address(pieces[0]) == a.ctypes.data + 90
    assert _address(pieces[1]) == _address(memoryview(b))
    b[0] = 255
    assert pieces[1][0] == 255  # a view, not a copy
    assert digest.chunk_parts([a, b], 0, 0) == []
    with pytest.raises(LocalProtocolError, match="outside"):
        digest.chunk_parts([a, b], 140, 11)


def test_chunk_parts_skip_empty_parts() -> None:
    parts = [b"", b"abcdefgh", b"", b"", b"ij", b""]
    assert [bytes(p) for p in digest.chunk_parts(parts, 0, 10)] == [b"abcdefgh", b"ij"]
    assert [bytes(p) for p in digest.chunk_parts(parts, 8, 2)] == [b"ij"]
    index = digest.PartIndex(parts)
    assert index.total == 10
    assert [bytes(p) for p in index.slice(7, 2)] == [b"h", b"i"]


def test_aligned_chunk_parts_joins_only_misaligned_chunks() -> None:
    parts = [bytes(range(16)), bytes(range(16, 28)), bytes(range(28, 64))]
    aligned = digest.aligned_chunk_parts(parts, 0, 20)
    assert [len(p) for p in aligned] == [16, 4] and all(isinstance(p, memoryview) for p in aligned)
    joined = digest.aligned_chunk_parts(parts, 16, 20)  # 12 bytes then 8: not word-aligned
    assert joined == [bytes(range(16, 36))]


@FUZZ
@given(data_and_cuts(max_size=400), st.integers(1, 70), st.sampled_from(digest.ALGORITHMS))
def test_chunk_sums_do_not_depend_on_how_the_stream_is_split(
    dc: tuple[bytes, list[int]], chunk_size: int, alg: str
) -> None:
    data, cuts = dc
    parts = split(data, cuts)
    got = digest.chunk_sums(parts, chunk_size, alg)
    assert got == digest.chunk_sums([data], chunk_size, alg)
    expected = [
        (off, min(chunk_size, len(data) - off), ref(data[off : off + chunk_size], alg))
        for off in range(0, len(data), chunk_size)
    ]
    assert got == expected
    for (off, length, s), (off2, length2, pieces) in zip(got, digest.iter_chunk_parts(parts, chunk_size), strict=True):
        assert (off, length) == (off2, length2)
        assert b"".join(pieces) == data[off : off + length]
        assert digest.chunk_sum(digest.aligned_chunk_parts(parts, off, length), alg) == s


def test_iter_chunk_parts_from_a_boundary() -> None:
    data = bytes(range(100))
    chunks = list(digest.iter_chunk_parts([data[:33], data[33:]], 32, offset=64))
    assert [(o, n) for o, n, _ in chunks] == [(64, 32), (96, 4)]
    with pytest.raises(LocalProtocolError, match="chunk boundary"):
        next(digest.iter_chunk_parts([data], 32, offset=10))
    with pytest.raises(LocalProtocolError, match="positive"):
        digest.chunk_sums([data], 0)


# --- stream_digest -----------------------------------------------------------------------------------------


def test_stream_digest_binds_offsets_lengths_sums_and_algorithm() -> None:
    triples = [(0, 8, 1), (8, 8, 2), (16, 3, 3)]
    d = digest.stream_digest(triples, "sum64")
    alg, _, hexpart = d.partition(":")
    assert alg == "sum64" and len(hexpart) == 32 and int(hexpart, 16) >= 0
    assert digest.stream_digest(list(reversed(triples)), "sum64") == d  # taken in offset order
    assert digest.stream_digest(triples, "crc32") != d
    for i in range(3):
        for j in range(3):
            changed = [list(t) for t in triples]
            changed[i][j] += 1
            assert digest.stream_digest([tuple(t) for t in changed], "sum64") != d
    assert digest.stream_digest(triples[:2], "sum64") != d
    assert digest.stream_digest([], "sum64").startswith("sum64:")


def test_stream_digest_rejects_bad_triples() -> None:
    with pytest.raises(LocalProtocolError, match="2\\*\\*64"):
        digest.stream_digest([(0, 8, 2**64)], "sum64")
    with pytest.raises(LocalProtocolError, match="2\\*\\*64"):
        digest.stream_digest([(-1, 8, 0)], "sum64")
    with pytest.raises(LocalProtocolError, match="unknown"):
        digest.stream_digest([], "sha1")


def test_stream_digest_of_the_same_bytes_split_differently() -> None:
    data = np.random.default_rng(3).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    a = digest.stream_digest(digest.chunk_sums([data], 1024), "sum64")
    b = digest.stream_digest(digest.chunk_sums([data[:7], data[7:5000], data[5000:]], 1024), "sum64")
    corrupt = bytearray(data)
    corrupt[9000] ^= 0x10
    c = digest.stream_digest(digest.chunk_sums([corrupt], 1024), "sum64")
    assert a == b != c
