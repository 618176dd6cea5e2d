"""Keep a daemon's memory honest and fast: chunk frames reuse warm heap memory while streams run and give it
back when they stop, large freed buffers go back to the OS at once, and fresh receive buffers are populated
for writing in one system call (large ones may sit on huge pages: ``fedbus.modelio.buffers.fresh_buffer``).

glibc raises its mmap threshold after the first large free (up to 32 MiB), after which large buffers come
from the heap and stay resident once freed. A fixed threshold keeps that from growing: buffers above it
(tensors, mostly) are mappings of their own, returned on free. It sits above a chunk's frame (zmq's receive
buffer, 2 MiB by default), because a frame that is a mapping of its own is fresh memory: a page fault per
4 KiB on zmq's I/O thread, for every byte received. The heap's frames are reused warm while streams run,
and ``release_free_memory`` gives them back once the last stream of a burst ends.

Measured (2 cores): a zmq receiver holding 32 frames of 2 MiB, as a credit window does, took 262,656 page
faults a GiB at a 1 MiB threshold (the tenth session's daemons) and received 1.3-1.4 GB/s; at 4 MiB 1.5-22 k
faults and 2.3-3.0 GB/s, and the trim after each GiB (2-4 ms) brought RSS back to where it started.
``fedbus bench round`` on a 16-core host, 1 MiB against 4 MiB (with ``ARENAS``), interleaved: S = 512, N = 4
``round_s`` 1.31 -> 1.02-1.18, S = 256, N = 16 2.38-2.57 -> 1.89-2.07 with the broker's CPU a round 10.2-11.5
-> 6.4-7.5 s, S = 64, N = 4 0.195 -> 0.159-0.170 (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import mmap
from typing import Any

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
        ("malloc_trim", [ctypes.c_size_t]),
    ):
        if hasattr(libc, func):
            getattr(libc, func).argtypes = argtypes
    return libc


_tuned = False

M_ARENA_MAX = -8
ARENAS = 2
"""glibc heaps a daemon's threads allocate from: the loop's and one for the rest. Each thread otherwise gets one
of its own (up to 8 per core), and zmq's I/O threads each kept the high-water mark of the frames they had
received: ``broker_rss_x`` at S = 256, N = 16 rose from 2.35 (frames as mappings of their own) to 2.63-2.82
with frames on the heap, and came back to 2.42-2.47 with two heaps (16-core host, interleaved)."""


def tune_malloc(mmap_threshold: int = 4 << 20) -> bool:
    """Fix glibc's mmap and trim thresholds and its number of heaps; a no-op (False) where libc is not glibc.
    For a daemon's own process only (``Broker.run``, ``Site.run``, before any thread starts), never a library's
    host. ``mmap_threshold`` must stay above a chunk's frame."""
    global _tuned
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt(M_ARENA_MAX, ARENAS)
    _tuned = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * mmap_threshold))
    return _tuned


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (``malloc_trim``: 2-4 ms with torch loaded), in a process whose
    allocator ``tune_malloc`` tuned; elsewhere (a library in someone else's process) nothing."""
    trim = getattr(_libc(), "malloc_trim", None)
    if _tuned and trim is not None:
        trim(0)


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
