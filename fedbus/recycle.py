"""Recycled files: a file whose bytes are no longer needed is renamed for the next writer instead of deleted,
so its page-cache pages are overwritten rather than freed and allocated (and zeroed) again.

Writing into a recycled file costs a fraction of the CPU of writing a new one, through a shared mapping or with write(2)
alike (docs/benchmarks.md). The broker's upload spools, a site's downloads (written through a mapping) and a training
script's result files (written by ``serde.write_file``) all go through a pool.

A pool is a folder's files named ``.free-*``, found by listing the folder: two processes sharing a folder (a
site and its training script) share its pool, and taking a file is one atomic rename, so two takers never get
the same one. Only regular files are taken (a planted symlink is skipped).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat

FREE_PREFIX = ".free-"
HELD_PREFIX = ".held-"
"""A site's task file a training script took (``fedbus.client._files``); the site deletes leftovers when the
script ends, the script recycles it once no tensor maps it."""


class FilePool:
    """The released files of one folder, at most ``keep`` of them, for the next files written there."""

    def __init__(self, folder: str | os.PathLike[str], keep: int = 4) -> None:
        self.folder = os.fspath(folder)
        self.keep = keep

    def free(self) -> list[str]:
        """Paths of the files waiting to be reused."""
        try:
            with os.scandir(self.folder) as entries:
                return [e.path for e in entries if e.name.startswith(FREE_PREFIX)]
        except OSError:
            return []

    def take(self, path: str | os.PathLike[str]) -> bool:
        """Put a released file at ``path`` (replacing what is there); False when there was none. The caller
        overwrites it without truncating first, then sets its length."""
        for free in self.free():
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(free).st_mode):
                    os.rename(free, path)
                    return True
        return False

    def give(self, path: str | os.PathLike[str]) -> None:
        """Release ``path``: kept for reuse while the pool has room, else deleted."""
        if len(self.free()) < self.keep:
            with contextlib.suppress(OSError):
                os.rename(path, os.path.join(self.folder, FREE_PREFIX + secrets.token_hex(6)))
                return
        with contextlib.suppress(OSError):
            os.unlink(path)

    def clear(self) -> None:
        """Delete every released file (the folder's owner is done with it)."""
        for free in self.free():
            with contextlib.suppress(OSError):
                os.unlink(free)
