"""Spooled receive: an incoming model goes to a file in the page cache, not to the process's memory.

Why: a broker folding N updates into one aggregate needs the global model and the aggregate in memory,
but never a whole update. Chunks are written where they belong with ``pwritev`` straight from the
frames (no intermediate buffer); once the stream is verified, ``SpooledParams`` hands the strategy one
tensor at a time. Broker memory stays about 2x the model whatever the number of sites, and an accepted
update sits in the page cache (and, under memory pressure, on disk) until it is folded in.

A spooled tensor is a view of a shared memory map of its own byte range of the file (``MAP_POPULATE``:
one system call maps every page): no copy and no fresh memory, where reading it back into a new tensor
would pay a first-touch page fault per 4 KiB, which dominated validating and folding an update
(docs/benchmarks.md). The mapping lives as long as the tensor: a strategy that folds one tensor at a time
holds one at a time.
Spool files are recycled (``fedbus.recycle.FilePool``): a released update's file is renamed for the next upload
instead of deleted, so its page-cache pages are overwritten rather than freed and allocated again (about a
third of the CPU to write). A file is only recycled once no tensor mapped from it is alive; otherwise it is
deleted (its mappings keep their data).
Tensors below ``MAP_MIN`` bytes are read with ``preadv`` instead (a mapping per bias vector costs more
than the copy). Files opened read-only (``open_params``) are read, since a read-only buffer cannot back a
writable tensor.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from fedbus import digest
from fedbus.errors import RemoteProtocolError, TransportError
from fedbus.modelio import serde
from fedbus.modelio.buffers import byte_view
from fedbus.modelio.sinks import BufferSink
from fedbus.protocol.messages import Offer
from fedbus.recycle import FilePool


class SpoolSink(BufferSink):
    """A sink whose bytes go to ``path`` with positional writes; the result is a lazy ``SpooledParams``."""

    # Received into a file, not a buffer: BufferSink's stream handling with another result (see ``finish``).
    result: asyncio.Future[SpooledParams]  # type: ignore[assignment]

    def __init__(
        self,
        *,
        path: str,
        max_total: int,
        expected: Any = None,
        keep: bool = False,
        pool: FilePool | None = None,
        scan_finite: bool = False,
    ) -> None:
        super().__init__(max_total=max_total, expected=expected, path=path, scan_finite=scan_finite)
        self._fd = -1
        self.keep = keep
        self.pool = None if keep else pool

    def _allocate(self, offer: Offer, resume: bool) -> None:
        assert self.path is not None
        if self.pool is not None:
            self.pool.take(self.path)  # no O_TRUNC: a recycled file's pages are overwritten, not freed
        trunc = 0 if self.pool is not None else os.O_TRUNC
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | trunc, 0o600)
            os.ftruncate(self._fd, offer.total)
        except OSError as exc:  # the receiver's disk (read-only, full): the stream is refused with the reason
            raise TransportError(f"cannot write {self.path}: {exc}") from exc

    def write(self, off: int, frames: Sequence[memoryview]) -> int:
        pos = off
        pending = list(frames)
        while pending:  # pwritev may write less than asked (rare): continue where it stopped
            try:
                n = os.pwritev(self._fd, pending, pos)
            except OSError as exc:  # a full disk fails the stream with a reason, not the receiving task
                raise TransportError(f"cannot write {self.path}: {exc}") from exc
            pos += n
            while pending and n >= pending[0].nbytes:
                n -= pending[0].nbytes
                pending.pop(0)
            if pending and n:
                pending[0] = pending[0][n:]
        if self._scan is not None:
            self._scan.scan(off, frames)
        return digest.chunk_sum(frames, self.alg)

    def finish(self) -> SpooledParams:  # type: ignore[override]  # a lazy mapping of the file, not a dict
        head = os.pread(self._fd, len(self.header), 0)
        if head != self.header:
            self.close()
            raise RemoteProtocolError("stream header bytes differ from the offered header")
        params = SpooledParams(
            self._fd, self.path or "", self.specs, self.data_start, owned=not self.keep, pool=self.pool
        )
        fd = self._fd
        params.nonfinite = self.nonfinite(lambda at, n: os.pread(fd, n, at))
        self._fd = -1  # owned by the params now
        return params

    def close(self) -> None:
        super().close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if self.path:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)


MAP_MIN = 256 << 10
"""Tensors at least this large are mapped, smaller ones read (see the module docstring)."""


class SpooledParams(Mapping[str, torch.Tensor]):
    """A state_dict on disk: each access maps (or reads) one tensor, released when the tensor is dropped."""

    nonfinite: list[str] | None = None
    """The tensors a finite scan on arrival found a NaN or Inf in ([]: none); None: not scanned."""

    def __init__(
        self,
        fd: int,
        path: str,
        specs: Sequence[serde.TensorSpec],
        data_start: int,
        *,
        owned: bool = True,
        writable: bool = True,
        pool: FilePool | None = None,
    ) -> None:
        self._fd = fd
        self._pool = pool
        self._maps: list[weakref.ref[mmap.mmap]] = []
        self.path = path
        self._owned = owned
        self._writable = writable
        self._specs = {s.name: s for s in specs}
        self._data_start = data_start

    def __getitem__(self, name: str) -> torch.Tensor:
        spec = self._specs[name]
        if self._writable and spec.nbytes >= MAP_MIN:
            return self._mapped(spec)
        t = torch.empty(spec.shape, dtype=serde.DTYPES[spec.dtype])
        if t.element_size() and t.numel():
            got = os.preadv(self._fd, [byte_view(t.view(-1).view(torch.uint8))], self._data_start + spec.start)
            if got != spec.nbytes:
                raise RemoteProtocolError(f"spooled update {self.path} is truncated at {name!r}")
        return t

    def _mapped(self, spec: serde.TensorSpec) -> torch.Tensor:
        start = self._data_start + spec.start
        base = start - start % mmap.ALLOCATIONGRANULARITY
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mm = mmap.mmap(self._fd, start + spec.nbytes - base, flags=flags, offset=base)
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=spec.nbytes, offset=start - base)
        t = raw.view(serde.DTYPES[spec.dtype]).view(spec.shape)  # keeps ``mm`` alive, unmapped with the tensor
        if self._pool is not None:
            self._maps.append(weakref.ref(mm))  # alive as long as any view of the tensor is
        return t

    def describe(self, name: str) -> torch.Tensor:
        """A data-less tensor (device "meta") with the tensor's dtype and shape, for structure checks;
        ``__getitem__`` loads the data (on the CPU)."""
        spec = self._specs[name]
        return torch.empty(spec.shape, dtype=serde.DTYPES[spec.dtype], device="meta")

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs  # Mapping's default would map (load) the tensor only to drop it

    def __len__(self) -> int:
        return len(self._specs)

    def keep_as(self, path: str | os.PathLike[str]) -> bool:
        """Move a spooled update's file to ``path`` and leave it there on ``release`` (its tensors stay valid):
        an accepted update that must outlive the process until its aggregate is checkpointed. False when this
        is not an owned, open spool file (the caller then writes a copy)."""
        if not self._owned or self._fd < 0:
            return False
        os.replace(self.path, path)
        self.path, self._owned = os.fspath(path), False
        return True

    def release(self) -> None:
        """Close (and, for a spooled update, delete) the file: the update has been folded in or refused."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if self._owned and self._pool is not None and all(m() is None for m in self._maps):
                self._pool.give(self.path)
            elif self._owned:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)


def open_params(
    path: str | os.PathLike[str], *, max_total: int, offset: int = 0, length: int | None = None
) -> SpooledParams:
    """A ``.safetensors`` file (or the ``length`` bytes at ``offset`` of one, ``serde.append_to``) as a lazy
    state_dict: a consumer that copies it (a strategy starting from a checkpoint) then holds one model in
    memory, not two. Call ``release()`` when done."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data_start, specs, _ = serde.read_header(fd, max_total=max_total, offset=offset, length=length)
    except BaseException:
        os.close(fd)
        raise
    return SpooledParams(fd, str(path), specs, offset + data_start, owned=False, writable=False)
