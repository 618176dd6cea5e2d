"""Keep a daemon's memory honest and fast: chunk frames reuse warm heap memory while streams run and give it
back when they stop, large freed buffers go back to the OS at once, and fresh receive buffers are populated
for writing in one system call (large ones may sit on huge pages: ``fedbus.modelio.buffers.fresh_buffer``).

glibc raises its mmap threshold after the first large free (up to 32 MiB), after which large buffers come
from the heap and stay resident once freed. A fixed threshold keeps that from growing: buffers above it
(tensors, mostly) are mappings of their own, returned on free. It sits above a chunk's frame (zmq's receive
buffer, 2 MiB by default), because a frame that is a mapping of its own is fresh memory: a page fault per
4 KiB on zmq's I/O thread, for every byte received. The heap's frames are reused warm while streams run,
and ``release_free_memory`` gives them back once the last stream of a burst ends. The page faults and round
times behind the threshold are in docs/benchmarks.md ("Why the defaults").
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
of its own (up to 8 per core), and each of zmq's I/O threads would keep the high-water mark of the frames it
received, which put the broker's memory at many sites over its target (docs/benchmarks.md)."""


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
    """Give the heap's free pages back to the OS (``malloc_trim``, a few ms with torch loaded), in a process whose
    allocator ``tune_malloc`` tuned; elsewhere (a library in someone else's process) nothing."""
    trim = getattr(_libc(), "malloc_trim", None)
    if _tuned and trim is not None:
        trim(0)


def freeze_startup_objects() -> None:
    """Put every object alive now (a daemon after its imports: ~170,000 with torch) out of the garbage
    collector's reach, so its full collections stop walking them.

    Streaming allocates steadily (frames, messages, futures), which runs the collector, and a full collection
    would walk every imported object. For daemon processes only: a library must not freeze its host's objects.
    """
    gc.collect()
    gc.freeze()


# --- fresh receive buffers ------------------------------------------------------------------------------

MADV_POPULATE_WRITE = 23  # Linux 5.14+
_PAGE = mmap.PAGESIZE


def populate_for_write(address: int, length: int) -> bool:
    """Map the pages of [address, address + length) for writing with one system call, before a copy into them.

    A copy into fresh memory otherwise takes a page-fault trap per 4 KiB page; populating the range first does
    the same page allocation in the kernel without the traps. File-backed mappings gain nothing, so callers use
    it for anonymous buffers only. False where the kernel or libc cannot (Linux before 5.14): callers stop
    asking."""
    madvise = getattr(_libc(), "madvise", None)
    if madvise is None or length <= 0:
        return madvise is not None
    start = address - address % _PAGE
    end = address + length + (-(address + length)) % _PAGE
    return madvise(start, end - start, MADV_POPULATE_WRITE) == 0
