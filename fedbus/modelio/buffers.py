"""Buffers for models: fresh receive buffers (uninitialised uint8 tensors, large ones on transparent huge pages)
and byte views of a tensor's memory."""

from __future__ import annotations

import contextlib
import mmap

import torch

HUGE_BUFFER_MIN = 64 << 20  # below this a buffer is plain memory: a mapping of its own costs more than it saves


def fresh_buffer(size: int, *, huge: bool) -> torch.Tensor:
    """An uninitialised uint8 buffer of ``size`` bytes; with ``huge``, on transparent huge pages when large.

    A fresh buffer costs a page fault per 4 KiB page on its first write. Huge pages make that 512x fewer
    faults, which pays where the faults run on spare cores (the placement threads) and costs where they do
    not (a small VM's huge-page faults can be slow: docs/benchmarks.md). A large buffer is its own anonymous
    mapping, returned to the OS as soon as the last tensor viewing it is freed.
    """
    if not huge or size < HUGE_BUFFER_MIN or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(size, dtype=torch.uint8)
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError, AttributeError, ValueError):  # not Linux, or THP compiled out
        mem.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mem, dtype=torch.uint8)  # the tensor keeps ``mem`` alive as long as any view of it


def byte_view(t: torch.Tensor) -> memoryview:
    """The memory of a contiguous CPU tensor as a writable memoryview (through numpy: a tensor has no buffer
    protocol of its own). The view keeps the tensor alive."""
    # numpy declares ndarray's buffer protocol to type checkers for Python >= 3.12 only
    return memoryview(t.numpy())  # type: ignore[arg-type]
