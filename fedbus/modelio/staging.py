"""GPU tensors to and from host files through pinned staging buffers, several copies in flight.

A device-to-host copy into pageable memory (a file's mapping, a fresh buffer) runs at a fraction of the bus's speed:
the driver stages it through a small pinned buffer of its own, one piece at a time, and waits for each. Here each of
``WORKERS`` threads owns a pinned buffer of ``STAGE`` bytes (allocated once per process and reused) and a CUDA stream
of its own, and moves one segment of the model at a time: device -> pinned buffer (an asynchronous copy on its
stream), then pinned buffer -> file (``pwrite``: the kernel's copy into the page cache, no page faults in this
process). With several workers, one segment's device copy overlaps the others' writes. The other way is the same
in reverse: the file's (or any host tensor's) bytes into a pinned buffer, then an asynchronous copy onto the device.

Segments are consecutive byte ranges of the model: a large tensor is split into several, small tensors share one, so
a model of thousands of small tensors costs a few hundred copies, not thousands of waits.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from fedbus.modelio import serde
from fedbus.modelio.buffers import byte_view

STAGE = 32 << 20
"""Bytes per pinned staging buffer (one segment)."""
WORKERS = 4
"""Staging buffers and threads: segments in flight at once (``WORKERS x STAGE`` bytes of pinned memory, kept)."""


class Piece(NamedTuple):
    """``nbytes`` bytes of item ``item``, from byte ``start`` of it, at byte ``at`` of a segment."""

    item: int
    start: int
    nbytes: int
    at: int


def segments(sizes: Sequence[int], stage: int = STAGE) -> Iterator[list[Piece]]:
    """Consecutive items of ``sizes`` bytes cut into segments of at most ``stage`` bytes: each segment a list of
    pieces, every byte of every item in exactly one piece, in order."""
    if stage <= 0:
        raise ValueError(f"stage must be positive, got {stage}")
    current: list[Piece] = []
    used = 0
    for item, size in enumerate(sizes):
        start = 0
        while start < size:
            n = min(size - start, stage - used)
            current.append(Piece(item, start, n, used))
            used += n
            start += n
            if used == stage:
                yield current
                current, used = [], 0
    if current:
        yield current


class _Stager:
    """The process's pinned buffers (a queue: a worker takes one for a segment and gives it back) and its workers."""

    def __init__(self) -> None:
        self.free: queue.Queue[torch.Tensor] = queue.Queue()
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="fedbus-stage")
        for _ in range(WORKERS):
            self.free.put(torch.empty(STAGE, dtype=torch.uint8, pin_memory=True))
        self.streams: dict[tuple[int, int], torch.cuda.Stream] = {}
        self.lock = threading.Lock()

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        """A stream per worker thread and device, created once."""
        key = (threading.get_ident(), device.index if device.index is not None else torch.cuda.current_device())
        with self.lock:
            s = self.streams.get(key)
            if s is None:
                s = self.streams[key] = torch.cuda.Stream(device=key[1])
        return s


_stager: _Stager | None = None
_stager_lock = threading.Lock()


def _get() -> _Stager:
    global _stager
    with _stager_lock:
        if _stager is None:
            _stager = _Stager()
        return _stager


def prepare() -> None:
    """Allocate the pinned buffers and start the workers now, not on the first copy (a daemon's steady state)."""
    _get()


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a 1-D uint8 view (``t`` must be contiguous)."""
    flat = t.detach().reshape(-1)
    return flat if flat.dtype is torch.uint8 else flat.view(torch.uint8)


def device_to_file(fd: int, tensors: Sequence[torch.Tensor], offsets: Sequence[int]) -> None:
    """Write each CUDA tensor's bytes at its byte offset of the open file ``fd`` (which must be long enough),
    through the pinned staging buffers. Every tensor must be contiguous and on one device; the copies start after
    the work already queued on that device's current stream."""
    if not tensors:
        return
    device = tensors[0].device
    flats = [_flat(t) for t in tensors]
    ready = torch.cuda.current_stream(device).record_event()  # the producer's kernels before our copies
    stager = _get()

    def run(segment: list[Piece]) -> None:
        buf = stager.free.get()
        try:
            stream = stager.stream(device)
            stream.wait_event(ready)
            with torch.cuda.stream(stream):
                for p in segment:
                    buf[p.at : p.at + p.nbytes].copy_(flats[p.item][p.start : p.start + p.nbytes], non_blocking=True)
            stream.synchronize()
            # consecutive pieces of consecutive items lie together in the file: one write per run of them
            runs: list[tuple[int, int, int]] = []  # (file offset, segment offset, bytes)
            for p in segment:
                where = offsets[p.item] + p.start
                if runs and runs[-1][0] + runs[-1][2] == where and runs[-1][1] + runs[-1][2] == p.at:
                    runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + p.nbytes)
                else:
                    runs.append((where, p.at, p.nbytes))
            view = byte_view(buf)
            for where, at, n in runs:
                serde._pwrite_all(fd, view[at : at + n], where)
        finally:
            stager.free.put(buf)

    futures = [stager.pool.submit(run, seg) for seg in segments([f.numel() for f in flats])]
    for f in futures:
        f.result()


def host_to_device(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy each host tensor into its device tensor (same bytes; both contiguous; every destination on one device)
    through the pinned staging buffers. Returns once the copies are done."""
    if not pairs:
        return
    device = pairs[0][1].device
    srcs = [_flat(s) for s, _ in pairs]
    dsts = [_flat(d) for _, d in pairs]
    for s, d in zip(srcs, dsts, strict=True):
        if s.numel() != d.numel():
            raise ValueError(f"host tensor of {s.numel()} bytes cannot fill a device tensor of {d.numel()}")
    ready = torch.cuda.current_stream(device).record_event()  # nothing queued before may still read the targets
    stager = _get()

    def run(segment: list[Piece]) -> None:
        buf = stager.free.get()
        try:
            for p in segment:
                buf[p.at : p.at + p.nbytes].copy_(srcs[p.item][p.start : p.start + p.nbytes])
            stream = stager.stream(device)
            stream.wait_event(ready)
            with torch.cuda.stream(stream):
                for p in segment:
                    dsts[p.item][p.start : p.start + p.nbytes].copy_(buf[p.at : p.at + p.nbytes], non_blocking=True)
            stream.synchronize()  # the buffer is free again only once the device has read it
        finally:
            stager.free.put(buf)

    futures = [stager.pool.submit(run, seg) for seg in segments([s.numel() for s in srcs])]
    for f in futures:
        f.result()


def to_device(params: Mapping[str, torch.Tensor], device: str | torch.device) -> dict[str, torch.Tensor]:
    """Host tensors (a received model: views of its file's mapping, say) copied onto a CUDA device through the
    pinned staging buffers; tensors already there are returned as they are."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"to_device copies onto a CUDA device, not {dev}")
    out: dict[str, torch.Tensor] = {}
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, t in params.items():
        if t.device.type == "cuda":
            out[name] = t
            continue
        src = t.detach() if t.is_contiguous() else t.detach().contiguous()
        out[name] = torch.empty(src.shape, dtype=src.dtype, device=dev)
        if src.numel():
            pairs.append((src, out[name]))
    host_to_device(pairs)
    return out
