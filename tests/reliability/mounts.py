"""Small file systems for storage-fault tests: a tmpfs to fill, a loop-mounted ext4 to force read-only.

Both need root (``mount``); a test that cannot have one is skipped with the reason. Everything mounted is
unmounted (lazily, if busy) when the context ends, whatever happened inside.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (mount); running as uid {os.geteuid()}")


def _unmount(point: Path) -> None:
    if _run("umount", str(point)).returncode != 0:
        _run("umount", "-l", str(point))  # busy (a process still holds a file): detach it


@contextlib.contextmanager
def _mounted(point: Path, what: str, *args: str) -> Iterator[Path]:
    """``mount ARGS POINT``, unmounted at the end; skipped with mount's reason when it fails."""
    point.mkdir(parents=True, exist_ok=True)
    done = _run("mount", *args, str(point))
    if done.returncode != 0:
        pytest.skip(f"cannot mount {what} here: {done.stderr.strip()}")
    try:
        yield point
    finally:
        _unmount(point)


@contextlib.contextmanager
def small_tmpfs(point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's syntax: "16m") at ``point``."""
    _need_root("a small tmpfs")
    with _mounted(point, "a tmpfs", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs") as mounted:
        yield mounted


@contextlib.contextmanager
def loop_ext4(image: Path, point: Path, size_mb: int) -> Iterator[Path]:
    """An ext4 file system in the file ``image``, loop-mounted at ``point`` with ``errors=remount-ro``."""
    _need_root("a loop-mounted ext4")
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    made = _run("mkfs.ext4", "-q", "-F", str(image))
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
    with _mounted(point, "an ext4 image by loop", "-o", "loop,errors=remount-ro", str(image)) as mounted:
        yield mounted


def fill(path: Path) -> int:
    """Write ``path`` until the file system has no byte left (ENOSPC); returns the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            block = bytes(chunk)
            while True:
                try:
                    n = f.write(block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                written += n or 0
    return written


@contextlib.contextmanager
def kept_full(folder: Path, every: float = 0.02) -> Iterator[None]:
    """Keep the file system of ``folder`` full while the context lasts: a thread takes whatever space is freed
    (a writer's failed temporary file, say) every ``every`` seconds. The space is given back at the end."""
    stop = threading.Event()
    files: list[Path] = []

    def grab() -> None:
        while True:
            files.append(folder / f"fill-{len(files)}")
            fill(files[-1])
            if stop.wait(every):
                return

    files.append(folder / "fill")
    fill(files[0])
    thread = threading.Thread(target=grab, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        for path in files:
            path.unlink(missing_ok=True)
