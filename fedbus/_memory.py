"""Keep a daemon's memory honest: large freed buffers go back to the OS at once.

glibc raises its mmap threshold after the first large free (up to 32 MiB), after which 4 MiB frames
(zmq's receive buffers, one per chunk) come from the heap and stay resident once freed. A fixed
threshold of 1 MiB makes every chunk-sized buffer its own mapping, returned on free. Measured with
``fedbus bench round``: see docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap and trim thresholds; a no-op (False) where libc is not glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * mmap_threshold))
