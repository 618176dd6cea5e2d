"""What every benchmark needs: random models of a given size, memory readings, raw bus and memcpy ceilings."""

from __future__ import annotations

import json
import os
import resource
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


LAYOUTS = ("blocks", "llama-7b")
"""``blocks``: ``random_state_dict``'s 4 MiB matrices with biases; ``llama-7b``: a 7B transformer's tensors."""


def llama_shapes(
    layers: int = 32, width: int = 4096, ffn: int = 11008, vocab: int = 32000, dtype: torch.dtype = torch.bfloat16
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Names and shapes of a LLaMA-7B-style state_dict (6.74 G parameters: 13.5 GB in bfloat16): embeddings and
    head of ``vocab x width``; per layer q/k/v/o ``width x width``, gate/up/down ``ffn x width`` (down transposed)
    and two norms; a final norm."""
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
        "model.embed_tokens.weight": (dtype, (vocab, width)),
        "model.norm.weight": (dtype, (width,)),
        "lm_head.weight": (dtype, (vocab, width)),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{p}self_attn.{proj}.weight"] = (dtype, (width, width))
        out[f"{p}mlp.gate_proj.weight"] = (dtype, (ffn, width))
        out[f"{p}mlp.up_proj.weight"] = (dtype, (ffn, width))
        out[f"{p}mlp.down_proj.weight"] = (dtype, (width, ffn))
        out[f"{p}input_layernorm.weight"] = (dtype, (width,))
        out[f"{p}post_attention_layernorm.weight"] = (dtype, (width,))
    return out


def write_model_file(path: str | os.PathLike[str], shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> int:
    """Write a model of ``shapes`` with random weights straight into a safetensors file (``serde.write_generated``):
    no copy of the model is held beside the file's pages. The weights are slices of one 16 MiB pool of normal
    samples (scaled by 0.02, as an initialised transformer's), each tensor from a random offset: random numbers at
    memcpy's speed, where drawing 13 GB of normal samples would take minutes. Returns the file's size."""
    from fedbus.modelio import serde

    gen = torch.Generator().manual_seed(0)
    pools: dict[torch.dtype, torch.Tensor] = {}

    def fill(name: str, view: torch.Tensor) -> None:
        pool = pools.get(view.dtype)
        if pool is None:
            pool = pools[view.dtype] = (torch.randn(16 * MiB // view.element_size(), generator=gen) * 0.02).to(
                view.dtype
            )
        flat = view.view(-1)
        pos = 0
        while pos < flat.numel():
            start = int(torch.randint(0, pool.numel() // 2, (1,), generator=gen))
            n = min(flat.numel() - pos, pool.numel() - start)
            flat[pos : pos + n].copy_(pool[start : start + n])
            pos += n

    return serde.write_generated(path, shapes, fill)


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


GiB = 1 << 30


def process_cpu_s() -> float:
    """CPU seconds this process has used so far, every thread counted, ended ones too (``getrusage``): what a
    phase whose threads come and go (a raw ZeroMQ context's I/O threads) cost, as a difference of two readings."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def per_gib(cpu: dict[str, Any], moved: int) -> dict[str, Any]:
    """CPU seconds per GiB moved: every number of ``cpu`` (nested dicts too) over ``moved`` bytes, in GiB."""
    gib = moved / GiB
    return {k: per_gib(v, moved) if isinstance(v, dict) else round(v / gib, 3) for k, v in cpu.items()}


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
