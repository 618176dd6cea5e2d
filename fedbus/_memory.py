"""Keep a daemon's memory honest and fast: large freed buffers go back to the OS at once, and large fresh
receive buffers may sit on huge pages (``fresh_buffer``).

glibc raises its mmap threshold after the first large free (up to 32 MiB), after which 4 MiB frames
(zmq's receive buffers, one per chunk) come from the heap and stay resident once freed. A fixed
threshold of 1 MiB makes every chunk-sized buffer its own mapping, returned on free. Measured with
``fedbus bench round``: see docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import mmap
from typing import Any

import torch

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> Any:
    """The C library through ctypes (errno kept), or None where it cannot be loaded."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None
    for func, argtypes in (
        ("mallopt", [ctypes.c_int] * 2),
        ("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]),
    ):
        if hasattr(libc, func):
            getattr(libc, func).argtypes = argtypes
    return libc


def tune_malloc(mmap_threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap and trim thresholds; a no-op (False) where libc is not glibc."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * mmap_threshold))


def freeze_startup_objects() -> None:
    """Put every object alive now (a daemon after its imports: ~170,000 with torch) out of the garbage
    collector's reach, so its full collections stop walking them.

    Streaming allocates steadily (frames, messages, futures), which runs the collector: receiving 1 GiB took
    five young and one full collection, and the full one walked every imported object. ``fedbus bench
    transfer --size-mb 1024`` on 2 cores, receiver frozen after start-up: main-thread CPU 0.92 -> 0.86 s,
    cold 0.96 -> 1.03 GB/s (three runs each). For daemon processes only: a library must not freeze its
    host's objects.
    """
    gc.collect()
    gc.freeze()


# --- fresh receive buffers ------------------------------------------------------------------------------

MADV_POPULATE_WRITE = 23  # Linux 5.14+
_PAGE = mmap.PAGESIZE


def populate_for_write(address: int, length: int) -> bool:
    """Map the pages of [address, address + length) for writing with one system call, before a copy into them.

    A copy into fresh memory otherwise takes a page-fault trap per 4 KiB page; populating the range first does
    the same page allocation in the kernel without the traps: writing 1 GiB in 2 MiB chunks into a fresh
    buffer, 0.43-0.45 -> 0.38-0.41 CPU s; ``fedbus bench transfer --size-mb 1024``, receiver loop CPU 0.77-0.80
    -> 0.74-0.75 s, throughput within noise (2 cores, three runs each). No gain for file-backed mappings
    (measured: equal), so callers use it for anonymous buffers only. False where the kernel or libc cannot
    (Linux before 5.14): callers stop asking."""
    madvise = getattr(_libc(), "madvise", None)
    if madvise is None or length <= 0:
        return madvise is not None
    start = address - address % _PAGE
    end = address + length + (-(address + length)) % _PAGE
    return madvise(start, end - start, MADV_POPULATE_WRITE) == 0


HUGE_BUFFER_MIN = 64 << 20  # below this a buffer is plain memory: a mapping of its own costs more than it saves


def fresh_buffer(size: int, *, huge: bool) -> torch.Tensor:
    """An uninitialised uint8 buffer of ``size`` bytes; with ``huge``, on transparent huge pages when large.

    A fresh buffer costs a page fault per 4 KiB page on its first write. Huge pages make that 512x fewer
    faults, which pays where the faults run on spare cores (the placement threads) and costs where they do
    not: ``fedbus bench transfer --size-mb 1024`` on a 16-core host, one writer thread, 1.33 -> 2.23 GB/s;
    on the 2-core development VM 1.0 -> 0.49 GB/s (its huge-page faults are slow). A large buffer is its
    own anonymous mapping, returned to the OS as soon as the last tensor viewing it is freed.
    """
    if not huge or size < HUGE_BUFFER_MIN or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(size, dtype=torch.uint8)
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError, AttributeError, ValueError):  # not Linux, or THP compiled out
        mem.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mem, dtype=torch.uint8)  # the tensor keeps ``mem`` alive as long as any view of it
