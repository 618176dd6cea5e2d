"""Finiteness of an incoming model, checked chunk by chunk as its bytes arrive.

Why: a strategy refuses an update with a NaN or Inf anywhere (one would poison the global model for good),
and checking afterwards would read the whole update again (for a spooled update, map the file again and sum it)
on the strategy's time, and the strategy's decisions are serialized. Checked as each chunk lands, the bytes
are still in cache, the work is spread over the placement threads, and the strategy reads the answer.

A chunk's frames are checked element by element where whole elements lie inside a frame; an element cut by a
frame's edge is remembered and read back once the stream is complete. A chunk written again (after a NACK or
a resume) replaces what its first copy said. ``result`` answers only when every byte of the stream was
scanned; otherwise (a stream reopened from a journal) it says so and the strategy scans the update itself.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from fedbus.modelio import serde

# dtype -> (how its elements are read, exponent mask for a bit test (None: the sum test), sum accumulator)
_Kind = tuple[type[np.number], int | None, type[np.floating] | None]
_FLOATS: dict[str, _Kind] = {
    "F16": (np.float16, None, np.float32),  # a float16 sum would overflow for ordinary values
    "F32": (np.float32, None, None),
    "F64": (np.float64, None, None),
    "BF16": (np.uint16, 0x7F80, None),  # numpy has no bfloat16: all exponent bits set is Inf or NaN
}


class _Float(NamedTuple):
    start: int  # absolute offsets in the stream
    end: int
    name: str
    itemsize: int
    kind: _Kind


def all_finite(buf: memoryview | bytes, offset: int, count: int, kind: _Kind) -> bool:
    """No NaN or Inf among ``count`` elements at byte ``offset`` of ``buf``. The sum settles almost every
    case in one pass with no temporary; only a sum that overflowed from finite values needs the exact test."""
    dtype, mask, acc = kind
    arr: npt.NDArray[Any] = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)  # uint16 for a bit test
    if mask is not None:
        return not bool(np.any((arr & mask) == mask))
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(arr.sum(dtype=acc)):
            return True
    return bool(np.isfinite(arr).all())


class FiniteScan:
    """Which floating tensors of one stream hold a non-finite value, learned from its chunks."""

    def __init__(self, specs: Sequence[serde.TensorSpec], data_start: int) -> None:
        self._floats = [
            _Float(data_start + s.start, data_start + s.end, s.name, serde.ITEMSIZE[s.dtype], _FLOATS[s.dtype])
            for s in specs
            if s.dtype in _FLOATS and s.end > s.start
        ]
        self._starts = [f.start for f in self._floats]
        # chunk offset -> (its length, indexes of tensors with a non-finite element in it, cut elements)
        self._chunks: dict[int, tuple[int, list[int], list[tuple[int, int]]]] = {}

    def scan(self, off: int, frames: Sequence[memoryview]) -> None:
        """Check one chunk, whose frames hold the stream's bytes from ``off`` on (any thread)."""
        bad: list[int] = []
        cut: list[tuple[int, int]] = []  # (an element's offset, its tensor's index)
        pos = off
        for frame in frames:
            lo, hi = pos, pos + frame.nbytes
            i = max(0, bisect.bisect_right(self._starts, lo) - 1)
            while i < len(self._floats) and self._floats[i].start < hi:
                f = self._floats[i]
                a, b = max(lo, f.start), min(hi, f.end)
                if a < b:
                    size = f.itemsize
                    first = f.start + -(-(a - f.start) // size) * size  # the first whole element in [a, b)
                    last = f.start + (b - f.start) // size * size  # the end of the last whole one
                    if a < first:
                        cut.append((first - size, i))
                    if last < b:
                        cut.append((last, i))
                    if (
                        first < last
                        and i not in bad
                        and not all_finite(frame, first - lo, (last - first) // size, f.kind)
                    ):
                        bad.append(i)
                i += 1
            pos = hi
        self._chunks[off] = (pos - off, bad, cut)

    def result(self, total: int, read: Callable[[int, int], bytes]) -> list[str] | None:
        """Names of the tensors holding a non-finite value, in stream order ([]: none); None when some bytes
        of the ``total`` were never scanned. ``read(offset, n)`` returns stream bytes (for cut elements)."""
        bad: set[int] = set()
        cut: dict[int, int] = {}
        pos = 0
        for off in sorted(self._chunks):
            length, chunk_bad, chunk_cut = self._chunks[off]
            if off != pos:
                return None
            pos += length
            bad.update(chunk_bad)
            cut.update(chunk_cut)  # an element cut between two chunks is named by both
        if pos != total:
            return None
        for at, i in cut.items():
            f = self._floats[i]
            if i not in bad and not all_finite(read(at, f.itemsize), 0, 1, f.kind):
                bad.add(i)
        return [self._floats[i].name for i in sorted(bad)]
