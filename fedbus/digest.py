"""Stream digests at memory speed: per-chunk sums, and one stream digest built from them.

A model stream is checked twice: every chunk carries the sum of its bytes (a fault is caught and that
chunk re-sent, not the whole model), and the stream as a whole has a digest, a hash of the chunks'
``(offset, length, sum)`` triples. Hashing the triples, not the bytes, makes the stream digest cost 24
bytes per chunk, and binding each sum to its offset catches chunks written at the wrong place.

Why ``sum64`` is the default: it runs several times faster than raw ZeroMQ moves bytes over loopback, so it
adds little to a transfer, where crc32 is slower than the bus itself and would roughly halve throughput, and
the hashlib digests slower still (docs/benchmarks.md, "Physical limits", has the figures). The digest is there
to catch transmission and reassembly faults (a flipped bit, a torn, truncated or duplicated frame, a
chunk at the wrong offset), not forgery: authenticity comes from CurveZMQ's per-message MAC, which no
unkeyed digest could give anyway. What sum64 misses: 8-byte words swapped inside one chunk, and errors
that cancel exactly (the same bit set in one word and cleared in another). ``crc32`` catches those and
is there for when a stronger check is worth the time.

sum64 of a byte string: the little-endian uint64 words of the bytes (the tail zero-padded to a word)
summed modulo 2**64, plus ``length * 0x9E3779B97F4A7C15`` so appended or dropped zero bytes change it.
Any single flipped bit changes it. Because a byte at position ``i`` contributes ``b << 8 * (i % 8)``,
the sum of a concatenation can be folded part by part whatever the parts' lengths: ``chunk_sum``
never joins its parts, and its result does not depend on how the bytes were split into frames.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from fedbus.errors import LocalProtocolError

ALGORITHMS = ("sum64", "crc32")
DEFAULT_ALG = "sum64"

_MASK = (1 << 64) - 1
_MIX = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: a length of 1 already moves every bit
_TRIPLE = struct.Struct("<QQQ")

Buffer = Any
"""Anything with the buffer protocol: bytes, bytearray, memoryview, numpy arrays, zmq frames."""


def _byte_view(buf: Buffer) -> memoryview:
    """A flat, unsigned-byte memoryview over ``buf``, without copying."""
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if not mv.c_contiguous:
        raise LocalProtocolError("digest parts must be C-contiguous buffers")
    return mv if mv.ndim == 1 and mv.format == "B" else mv.cast("B")


def _check_alg(alg: str) -> None:
    if alg not in ALGORITHMS:
        raise LocalProtocolError(f"unknown digest algorithm {alg!r}; known: {', '.join(ALGORITHMS)}")


def _sum_words(mv: memoryview) -> int:
    """Wrapping sum of the little-endian uint64 words of ``mv`` (whose length is a multiple of 8)."""
    if not mv.nbytes:
        return 0
    # An add-reduce over an integer array wraps silently, which is exactly arithmetic mod 2**64.
    return int(np.frombuffer(mv, dtype="<u8").sum(dtype=np.uint64))


def chunk_sum(parts: Sequence[Buffer], alg: str = DEFAULT_ALG) -> int:
    """Digest of the concatenation of ``parts``, computed without joining them; an int in [0, 2**64).

    For sum64 each part is folded in at its byte phase, so parts may have any lengths; word-aligned
    parts (every part but the last a multiple of 8 long, as the sender arranges) take the fast path only.
    """
    _check_alg(alg)
    if alg == "crc32":
        crc = 0
        for part in parts:
            crc = zlib.crc32(_byte_view(part), crc)
        return crc
    total = 0
    pos = 0  # bytes folded so far; pos % 8 is the byte phase of the next part
    for part in parts:
        mv = _byte_view(part)
        n = mv.nbytes
        phase = pos % 8
        head = min(n, (8 - phase) % 8)
        if head:
            total += int.from_bytes(mv[:head], "little") << (8 * phase)
        words_end = head + (n - head) // 8 * 8
        total += _sum_words(mv[head:words_end])
        if words_end < n:
            total += int.from_bytes(mv[words_end:], "little")
        pos += n
    return (total + pos * _MIX) & _MASK


def stream_digest(chunk_sums: Iterable[tuple[int, int, int]], alg: str = DEFAULT_ALG) -> str:
    """Digest of a whole stream from its chunks' ``(offset, length, sum)`` triples: ``"<alg>:<32 hex>"``.

    blake2b-128 over the algorithm name and the packed triples, taken in offset order (sorted here,
    so a caller collecting chunks out of order gets the same answer). A missing, duplicated, moved or
    resized chunk changes the digest.
    """
    _check_alg(alg)
    h = hashlib.blake2b(digest_size=16, person=b"fedbus-stream")
    h.update(alg.encode("ascii") + b"\0")
    try:
        for triple in sorted(chunk_sums, key=lambda t: (t[0], t[1])):
            h.update(_TRIPLE.pack(*triple))
    except struct.error as exc:
        raise LocalProtocolError(f"chunk triples must be three ints in [0, 2**64): {exc}") from exc
    return f"{alg}:{h.hexdigest()}"


class PartIndex:
    """Random access into a stream given as consecutive buffers of any lengths.

    Built once per stream (O(parts)); ``slice`` then finds a byte range in O(log parts) and returns
    memoryview slices of the original buffers, so nothing is copied.
    """

    def __init__(self, parts: Sequence[Buffer]) -> None:
        self.views = [_byte_view(p) for p in parts]
        self.starts: list[int] = []
        pos = 0
        for v in self.views:
            self.starts.append(pos)
            pos += v.nbytes
        self.total = pos

    def slice(self, offset: int, length: int) -> list[memoryview]:
        """Zero-copy memoryviews covering stream bytes [offset, offset + length), empty pieces skipped."""
        if offset < 0 or length < 0 or offset + length > self.total:
            raise LocalProtocolError(f"range [{offset}, {offset + length}) outside a stream of {self.total} bytes")
        out: list[memoryview] = []
        end = offset + length
        i = max(0, bisect.bisect_right(self.starts, offset) - 1)
        while offset < end:
            view, start = self.views[i], self.starts[i]
            lo = offset - start
            hi = min(view.nbytes, end - start)
            if hi > lo:
                out.append(view[lo:hi])
                offset = start + hi
            i += 1
        return out


def _as_index(parts: Sequence[Buffer] | PartIndex) -> PartIndex:
    return parts if isinstance(parts, PartIndex) else PartIndex(parts)


def is_word_aligned(pieces: Sequence[memoryview]) -> bool:
    """True when every piece but the last is a multiple of 8 bytes long (sum64's fast path throughout)."""
    return all(p.nbytes % 8 == 0 for p in pieces[:-1])


def chunk_parts(parts: Sequence[Buffer] | PartIndex, offset: int, length: int) -> list[memoryview]:
    """The zero-copy memoryview slices of ``parts`` covering [offset, offset + length).

    These are a chunk's payload frames. Pass a ``PartIndex`` when slicing many chunks of one stream.
    """
    return _as_index(parts).slice(offset, length)


def aligned_chunk_parts(parts: Sequence[Buffer] | PartIndex, offset: int, length: int) -> list[Buffer]:
    """A chunk's payload frames: the memoryview slices when word-aligned, else one joined ``bytes``.

    The join costs one chunk-sized copy and happens only for chunks that straddle a tensor whose size
    is not a multiple of 8 (small odd-sized tensors sort last in safetensors). It is an optimisation,
    not a correctness need: ``chunk_sum`` gives the same answer for any split.
    """
    pieces = chunk_parts(parts, offset, length)
    if is_word_aligned(pieces):
        return list(pieces)
    return [b"".join(pieces)]


def iter_chunk_parts(
    parts: Sequence[Buffer] | PartIndex, chunk_size: int, offset: int = 0
) -> Iterator[tuple[int, int, list[memoryview]]]:
    """``(offset, length, slices)`` for every chunk from ``offset`` (a chunk boundary) to the end."""
    if chunk_size <= 0:
        raise LocalProtocolError(f"chunk size must be positive, got {chunk_size}")
    if offset < 0 or offset % chunk_size:
        raise LocalProtocolError(f"offset {offset} is not a chunk boundary (chunk size {chunk_size})")
    index = _as_index(parts)
    for off in range(offset, index.total, chunk_size):
        length = min(chunk_size, index.total - off)
        yield off, length, index.slice(off, length)


def chunk_sums(
    parts: Sequence[Buffer] | PartIndex, chunk_size: int, alg: str = DEFAULT_ALG
) -> list[tuple[int, int, int]]:
    """``(offset, length, sum)`` of every chunk [k * chunk_size, min(total, (k + 1) * chunk_size)).

    ``parts`` is the whole stream as consecutive buffers of any lengths (e.g. the safetensors header
    then one memoryview per tensor); chunks may span parts and parts may span chunks. Nothing is copied.
    """
    _check_alg(alg)
    return [(off, n, chunk_sum(pieces, alg)) for off, n, pieces in iter_chunk_parts(parts, chunk_size)]
