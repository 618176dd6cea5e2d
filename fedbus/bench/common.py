"""What every benchmark needs: random models of a given size, memory readings, raw bus and memcpy ceilings."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import torch

MiB = 1 << 20


def random_state_dict(size_mb: float, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A model-shaped state_dict of about ``size_mb`` MiB: large weight matrices with small biases.

    Layers are 4 MiB-ish matrices plus bias vectors, like a transformer's blocks, so the layout has both
    big tensors (zero-copy frames) and many small ones (header and frame-count overheads).
    """
    gen = torch.Generator().manual_seed(seed)
    item = torch.empty((), dtype=dtype).element_size()
    remaining = int(size_mb * MiB) // item
    out: dict[str, torch.Tensor] = {}
    width = 1024
    i = 0
    while remaining > 0:
        rows = max(1, min(1024, remaining // width))
        n = rows * width if remaining >= width else remaining
        w = torch.empty(n, dtype=dtype)
        if dtype.is_floating_point:
            w.normal_(generator=gen)
        else:
            w.random_(0, 100, generator=gen)
        out[f"layer{i}.weight"] = w.view(rows, width) if n == rows * width else w
        remaining -= n
        if remaining >= width:
            b = torch.empty(width, dtype=dtype)
            b.normal_(generator=gen) if dtype.is_floating_point else b.random_(0, 100, generator=gen)
            out[f"layer{i}.bias"] = b
            remaining -= width
        i += 1
    return out


def model_bytes(state_dict: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def rss() -> int:
    """Current resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size (VmHWM) of this process in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss(pid: int | None = None) -> None:
    """Reset a process's VmHWM (this one's by default) to its current RSS (Linux: write 5 to clear_refs), so a
    phase's peak is its own. Where the kernel refuses, the peak keeps counting from the process's start."""
    try:
        with open(f"/proc/{'self' if pid is None else pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def thread_cpu(pid: int | None = None) -> dict[str, float]:
    """CPU seconds so far of a process's threads (this one's by default), by kind: ``main`` (the event loop),
    ``zmq_io`` (libzmq's I/O threads, which move every byte through the kernel) and ``other`` (placement and
    strategy threads, torch/OpenMP pools, executors).

    Compared with the wall time of a phase it says which thread saturates: a kind near 1.0 s of CPU per
    second is the bottleneck. Read from ``/proc/self/task/*/schedstat`` (nanoseconds) where the kernel keeps
    it, else ``stat`` (clock ticks)."""
    out = {"main": 0.0, "zmq_io": 0.0, "other": 0.0}
    pid = os.getpid() if pid is None else pid
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:  # the process is gone (or this is not Linux)
        return out
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/comm") as f:
                name = f.read().strip()
            with open(f"{base}/schedstat") as f:
                seconds = int(f.read().split()[0]) / 1e9
            if not seconds:  # schedstat off: utime + stime from stat
                with open(f"{base}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                seconds = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue  # the thread ended while we read it
        kind = "main" if int(tid) == pid else "zmq_io" if name.startswith("ZMQbg/IO") else "other"
        out[kind] += seconds
    return out


def cpu_since(before: dict[str, float]) -> dict[str, float]:
    """``thread_cpu()`` now minus ``before``, rounded for a report."""
    return {k: round(v - before.get(k, 0.0), 3) for k, v in thread_cpu().items()}


def memcpy_gbps(size: int = 256 * MiB, repeats: int = 3) -> float:
    """Copy bandwidth into a reused buffer: the ceiling for any path that copies bytes once."""
    src = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    dst = np.empty_like(src)
    dst[:] = src
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst[:] = src
        best = min(best, time.perf_counter() - t)
    return size / best / 1e9


def format_report(rows: list[tuple[str, Any]], result: dict[str, Any]) -> str:
    """The benchmark's human table, then its machine-readable last line (one JSON object)."""
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append(json.dumps(result, sort_keys=True))
    return "\n".join(lines)
