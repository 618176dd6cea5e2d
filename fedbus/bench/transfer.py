"""``fedbus bench transfer``: one model from one process to another, against the bus's own ceiling.

The parent process is the sender (a DEALER, like a site uploading); a child process is the receiver
(a bound ROUTER, like the broker). The model is sent twice: cold (the figure that counts: a fresh receive
buffer, whose page faults dominate on a small machine) and warm (the receiver reuses its buffer, as in
steady-state rounds). In one run:
1. raw ZeroMQ: the same byte count as 4 MiB frames, ``copy=False``, a credit window, the receiver
   discarding what it gets, over one connection: what the bus can do with no serialization, digests or
   placement (``ratio``); and again from slices of one buffer the model's size (``raw_zmq_spread_gbps``,
   ``ratio_vs_spread``): each byte leaves memory once, as a model's do, where the first figure sends one
   cache-hot 4 MiB buffer; and, where fedbus spreads its chunks over several connections (``--lanes``, by
   default a site's ``stream_lanes``), raw ZeroMQ from memory over as many (``raw_zmq_lanes_gbps``,
   ``ratio_vs_lanes``: the ceiling of what fedbus does then);
2. fedbus: a random state_dict serialized (zero-copy layout), streamed with credit and digests, received
   into one preallocated buffer and returned as tensors; each side's zmq context has a daemon's I/O threads;
3. memcpy into a reused buffer: the cost of touching every byte once.
Memory figures are peak RSS growth over the RSS before the model exists, as multiples of the model size.

The whole sequence runs ``--repeat`` times (3): one run is a third of a second at 1 GiB, and the host's bus
drifts between runs, so the report is the run with the median ratio (every run's ratio is in ``ratios``),
and the memory figures are the worst run's.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from fedbus._memory import freeze_startup_objects
from fedbus.bench.common import (
    MiB,
    cpu_since,
    format_report,
    memcpy_gbps,
    model_bytes,
    peak_rss,
    per_gib,
    process_cpu_s,
    random_state_dict,
    reset_peak_rss,
    rss,
    thread_cpu,
)
from fedbus.errors import ConfigError
from fedbus.modelio import serde
from fedbus.modelio.sinks import BufferSink
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.messages import STREAM_TYPES, Reply
from fedbus.transport.context import Context
from fedbus.transport.curve import curve_keypair
from fedbus.transport.endpoint import (
    LANE_STAGGER,
    MAX_LANES,
    DealerEndpoint,
    RouterEndpoint,
    daemon_context,
    io_threads,
    stream_lanes,
)
from fedbus.transport.raw import CURVE_ENV, RAW_FRAME, curve_from_env, raw_receiver, raw_send
from fedbus.transport.streams import DEFAULT_CHUNK, DEFAULT_WINDOW, StreamHub


def _addresses(transport: str) -> tuple[str, str]:
    if transport == "tcp":
        return "tcp://127.0.0.1:0", "tcp://127.0.0.1:0"
    folder = tempfile.mkdtemp(prefix="fedbus-bench-")
    return f"ipc://{folder}/raw", f"ipc://{folder}/fedbus"


# --- receiver (child process) ---------------------------------------------------------------------------


async def _fedbus_receive(ep: RouterEndpoint, window: int, chunk: int, device: str = "cpu") -> None:
    """Receive the model twice: cold (a fresh buffer, as any first receive) and warm (the first buffer reused,
    as a broker or site receiving the same shapes round after round)."""
    baseline = rss()
    offers: asyncio.Queue[BufferSink] = asyncio.Queue()
    reuse: list[torch.Tensor] = []
    cpu_at_offer: dict[str, float] = {}

    async def on_offer(peer: bytes, offer: Any) -> BufferSink:
        if not reuse:
            reset_peak_rss()
            cpu_at_offer.update(thread_cpu())
        sink = BufferSink(max_total=offer.total, buffer=reuse[0] if reuse else None)
        offers.put_nowait(sink)
        return sink

    hub = StreamHub(ep, on_offer=on_offer, window=window, chunk_size=chunk)
    pump = asyncio.ensure_future(_route(ep, hub))
    sink = await offers.get()
    tensors = await sink.result
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    stats: dict[str, Any] = {"peak_growth": peak_rss() - baseline, "tensors": len(tensors), "model_bytes": nbytes}
    stats["cpu"] = cpu_since(cpu_at_offer)
    assert sink.buffer is not None
    reuse.append(sink.buffer)
    warm = await offers.get()
    await warm.result  # the same model into the same buffer: ``tensors`` hold it again
    if device != "cpu":  # onto the GPU, as a script would (after the warm send, not to delay it)
        from fedbus.modelio import staging

        start = time.perf_counter()
        on_device = staging.to_device(tensors, device)
        torch.cuda.synchronize()
        stats["h2d"] = time.perf_counter() - start
        exact = all(torch.equal(on_device[k].view(torch.uint8).cpu(), t.view(torch.uint8)) for k, t in tensors.items())
        stats["h2d_exact"] = exact
        del on_device
    del tensors
    await ep.send(sink.peer, Reply(rid=0, ok=True, data=stats))
    await asyncio.sleep(0.2)  # let the reply leave before the socket closes
    pump.cancel()
    await hub.close()


async def _route(ep: RouterEndpoint, hub: StreamHub) -> None:
    while True:
        inc = await ep.recv()
        if inc.msg.TYPE in STREAM_TYPES:
            await hub.dispatch(inc.peer, inc.msg, inc.payload)


def _announce(address: str) -> None:
    """Tell the parent process the bound address (the first line of the child's output)."""
    sys.stdout.write(address + "\n")
    sys.stdout.flush()


def receiver_main(
    mode: str, address: str, total: int, window: int, chunk: int, lanes: int = 1, device: str = "cpu"
) -> None:
    """Entry point of the child process: ``raw`` discards frames, ``fedbus`` receives a model."""
    if mode == "raw":
        before = process_cpu_s()
        raw_receiver(address, total, lanes, announce=_announce)
        _announce(f"{process_cpu_s() - before:.6f}")  # the second line: the receive's CPU seconds, every thread
        return
    if device != "cpu":  # a script's CUDA context and staging buffers exist before its first model arrives
        from fedbus.modelio import staging

        torch.empty(1, device=device)
        staging.prepare()
    freeze_startup_objects()  # as the daemons do
    actx = daemon_context(server=True)
    ep = RouterEndpoint.bind(actx, address, configure=lambda sock: curve_from_env(sock, server=True))
    _announce(ep.address)
    asyncio.run(_fedbus_receive(ep, window, chunk, device))
    ep.close()
    actx.term()


def _child(
    mode: str, address: str, total: int, window: int, chunk: int, lanes: int = 1, device: str = "cpu"
) -> tuple[subprocess.Popen, str]:
    args = [mode, address, str(total), str(window), str(chunk), str(lanes), device]
    proc = subprocess.Popen([sys.executable, "-m", "fedbus.bench.transfer", *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def _end(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass(frozen=True)
class RawRun:
    """One raw ZeroMQ transfer: its rate, and the CPU seconds each side's process spent on it (every thread,
    libzmq's I/O threads included)."""

    gbps: float
    send_cpu_s: float
    recv_cpu_s: float


def raw_zmq_run(
    total: int, window: int = 32 * MiB, transport: str = "tcp", *, spread: bool = False, lanes: int = 1
) -> RawRun:
    """The bus's ceiling: ``total`` bytes as 4 MiB frames, copy=False, credit window, receiver discarding.

    The frames are one reused 4 MiB buffer, hot in the sender's cache. ``spread``: consecutive slices of a
    ``total``-byte buffer instead, each byte sent once from memory, as a model is (a second, fairer ceiling;
    its sender CPU then includes filling that buffer). ``lanes``: over that many connections (and zmq I/O
    threads on each side), frames in turn."""
    proc, address = _child("raw", _addresses(transport)[0], total, window, RAW_FRAME, lanes)
    try:
        before = process_cpu_s()
        seconds = raw_send(address, total, window, spread=spread, lanes=lanes)
        send_cpu = process_cpu_s() - before
        assert proc.stdout is not None
        recv_cpu = float(proc.stdout.readline().strip() or "nan")
        return RawRun(total / seconds / 1e9, send_cpu, recv_cpu)
    finally:
        _end(proc)


def raw_zmq_gbps(
    total: int, window: int = 32 * MiB, transport: str = "tcp", *, spread: bool = False, lanes: int = 1
) -> float:
    """``raw_zmq_run``'s rate alone."""
    return raw_zmq_run(total, window, transport, spread=spread, lanes=lanes).gbps


# --- sender (parent process) ----------------------------------------------------------------------------


async def _fedbus_send(
    address: str, size_mb: float, chunk: int, window: int, device: str = "cpu", dtype: str = "float32", lanes: int = 1
) -> dict[str, Any]:
    ctx = Context(io_threads=max(io_threads(), lanes))  # a site's, or one per lane
    ep = DealerEndpoint.connect(ctx, address, configure=lambda sock: curve_from_env(sock, server=False), lanes=lanes)

    async def refuse(peer: bytes, offer: Any) -> None:
        return None

    hub = StreamHub(ep, on_offer=refuse, chunk_size=chunk, window=window)
    while not ep.lanes_connected:  # as the raw sender's, before the clock starts
        await asyncio.sleep(LANE_STAGGER)
    torch_dtype = getattr(torch, dtype)
    folder = tempfile.mkdtemp(prefix="fedbus-bench-")
    hand_over = os.path.join(folder, "model.safetensors")
    on_device = device != "cpu"
    if on_device:  # the model exists (on the GPU) before the baseline: what counts is the host memory it costs
        from fedbus.modelio import staging

        staging.prepare()  # as in a script's second round on: the pinned buffers are there
        model = {k: v.to(device) for k, v in random_state_dict(size_mb, seed=1, dtype=torch_dtype).items()}
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    baseline = rss()
    reset_peak_rss()
    if not on_device:
        model = random_state_dict(size_mb, seed=1, dtype=torch_dtype)
    size = model_bytes(model)
    pump = asyncio.create_task(_route_controls(ep, hub))
    cpu_before = thread_cpu()
    start = time.perf_counter()
    d2h = 0.0
    if on_device:  # flare.send's path: device -> hand-over file (page cache) -> stream from its mapping
        serde.write_file(hand_over, model, durable=False)
        d2h = time.perf_counter() - start
        source = ModelSource.from_file(hand_over)
    else:
        source = ModelSource.from_state_dict(model)
    await hub.send(b"", source)
    elapsed = time.perf_counter() - start
    sender_cpu = cpu_since(cpu_before)
    sender_growth = peak_rss() - baseline
    start = time.perf_counter()
    again = ModelSource.from_file(hand_over) if on_device else ModelSource.from_state_dict(model)
    await hub.send(b"", again)  # warm: the receiver reuses its buffer
    warm = time.perf_counter() - start
    reply = await pump
    ep.close()
    ctx.term()
    total = source.total
    del source, again
    shutil.rmtree(folder, ignore_errors=True)
    out: dict[str, Any] = {
        "elapsed": elapsed,
        "warm": warm,
        "size": size,
        "total": total,
        "sender_growth": sender_growth,
        "d2h": d2h,
    }
    out["sender_cpu"] = sender_cpu
    return {**out, **reply}


async def _route_controls(ep: DealerEndpoint, hub: StreamHub) -> dict[str, Any]:
    """The sender's receive loop: stream controls to the hub until the receiver's Reply arrives."""
    while True:
        inc = await ep.recv()
        if isinstance(inc.msg, Reply):
            return inc.msg.data
        if inc.msg.TYPE in STREAM_TYPES:
            await hub.dispatch(inc.peer, inc.msg, inc.payload)


def _one_run(
    size_mb: float, total: int, chunk: int, window: int, transport: str, device: str, dtype: str, lanes: int
) -> dict[str, Any]:
    """The bus's ceilings, then fedbus, back to back (one repetition of the benchmark)."""
    raw = raw_zmq_run(total, window, transport)
    raw_gbps = raw.gbps
    raw_spread_gbps = raw_zmq_gbps(total, window, transport, spread=True)
    raw_lanes_gbps = raw_zmq_gbps(total, window, transport, spread=True, lanes=lanes) if lanes > 1 else None
    proc, address = _child("fedbus", _addresses(transport)[1], total, window, chunk, device=device)
    try:
        fb = asyncio.run(_fedbus_send(address, size_mb, chunk, window, device, dtype, lanes))
    except BaseException:
        proc.kill()  # the receiver would wait for a model that is not coming
        raise
    finally:
        _end(proc)
    fedbus_gbps = fb["size"] / fb["elapsed"] / 1e9
    out = {"fb": fb, "raw_gbps": raw_gbps, "raw_spread_gbps": raw_spread_gbps, "fedbus_gbps": fedbus_gbps}
    out["raw_cpu"] = {"sender": raw.send_cpu_s, "receiver": raw.recv_cpu_s}
    out["raw_lanes_gbps"] = raw_lanes_gbps
    return out | {"ratio": fedbus_gbps / raw_gbps}


def run_transfer(
    size_mb: float,
    chunk_mb: float = DEFAULT_CHUNK / MiB,
    window_mb: float = DEFAULT_WINDOW / MiB,
    transport: str = "tcp",
    *,
    curve: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    repeat: int = 3,
    lanes: int | None = None,
) -> str:
    """Run the benchmark ``repeat`` times and report the median run; returns the report (a table, then one
    JSON line). ``curve``: CurveZMQ on.
    ``device``: the model lives there (``cuda``) and is sent as ``flare.send`` does: copied once into the
    hand-over file, then streamed from its mapping; ``d2h_s`` is the copy's share of ``fedbus_s``.
    ``lanes``: connections fedbus spreads its chunks over (default: a site's, ``stream_lanes``)."""
    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise ConfigError(f"--device {device!r}: only cpu, or cuda[:N] on a machine with a CUDA GPU")
    if curve:
        os.environ[CURVE_ENV] = ",".join(k.decode() for k in curve_keypair())
        try:
            report = run_transfer(
                size_mb, chunk_mb, window_mb, transport, device=device, dtype=dtype, repeat=repeat, lanes=lanes
            )
            return report.replace(f'"transport": "{transport}"', f'"transport": "{transport}+curve"')
        finally:
            del os.environ[CURVE_ENV]
    if repeat < 1:
        raise ConfigError(f"--repeat must be >= 1, got {repeat}")
    lanes = stream_lanes() if lanes is None else lanes
    if not 1 <= lanes <= MAX_LANES:
        raise ConfigError(f"--lanes must be in [1, {MAX_LANES}], got {lanes}")
    chunk, window = int(chunk_mb * MiB), int(window_mb * MiB)
    total = int(size_mb * MiB)
    runs = [_one_run(size_mb, total, chunk, window, transport, device, dtype, lanes) for _ in range(repeat)]
    # Each run measures the bus and then fedbus back to back; a host's raw ZeroMQ drifts by +-20 % within
    # minutes, so the ratio is the median of the runs' own
    # ratios (the lower middle one of an even count), and the run that gives it supplies the other figures.
    # Memory is the worst run's.
    median = sorted(runs, key=lambda r: r["ratio"])[(len(runs) - 1) // 2]
    fb, raw_gbps, raw_spread_gbps = median["fb"], median["raw_gbps"], median["raw_spread_gbps"]
    mem = memcpy_gbps()
    fedbus_gbps = median["fedbus_gbps"]
    result = {
        "size_mb": size_mb,
        "chunk_mb": chunk_mb,
        "window_mb": window_mb,
        "transport": transport,
        "repeat": repeat,
        "fedbus_s": round(fb["elapsed"], 4),
        "fedbus_gbps": round(fedbus_gbps, 3),
        "raw_zmq_gbps": round(raw_gbps, 3),
        "raw_zmq_spread_gbps": round(raw_spread_gbps, 3),
        "ratio_vs_spread": round(fedbus_gbps / raw_spread_gbps, 3),
        "memcpy_gbps": round(mem, 3),
        "ratio": round(fedbus_gbps / raw_gbps, 3),
        "ratios": [round(r["ratio"], 3) for r in runs],
        "lanes": lanes,
        "fedbus_warm_gbps": round(fb["size"] / fb["warm"] / 1e9, 3),
        "warm_ratio": round(fb["size"] / fb["warm"] / 1e9 / raw_gbps, 3),
        "sender_rss_x": round(max(r["fb"]["sender_growth"] for r in runs) / fb["size"], 3),
        "receiver_rss_x": round(max(r["fb"]["peak_growth"] for r in runs) / fb["size"], 3),
        "sender_cpu_s": fb["sender_cpu"],
        "receiver_cpu_s": fb["cpu"],
        "cpu_s_per_gib": _cpu_per_gib(fb, median["raw_cpu"]),
        "tensors": fb["tensors"],
        "device": device,
        "dtype": dtype,
    }
    if median["raw_lanes_gbps"] is not None:
        result |= {
            "raw_zmq_lanes_gbps": round(median["raw_lanes_gbps"], 3),
            "ratio_vs_lanes": round(fedbus_gbps / median["raw_lanes_gbps"], 3),
        }
    if device != "cpu":
        result |= {"d2h_s": round(fb["d2h"], 4), "d2h_gbps": round(fb["size"] / fb["d2h"] / 1e9, 3)}
        result |= {"h2d_s": round(fb["h2d"], 4), "h2d_gbps": round(fb["size"] / fb["h2d"] / 1e9, 3)}
        result["h2d_exact"] = fb["h2d_exact"]
    rows = [
        ("model", f"{size_mb} MiB in {fb['tensors']} tensors, {fb['total']} bytes on the wire"),
        ("chunk / window", f"{chunk_mb} MiB / {window_mb} MiB over {transport}, {lanes} connection(s)"),
        ("raw zmq", f"{raw_gbps:.2f} GB/s from one 4 MiB buffer (cache-hot)"),
        ("raw zmq, spread", f"{raw_spread_gbps:.2f} GB/s from {size_mb} MiB of memory, each byte once"),
        *(
            [("raw zmq, lanes", f"{result['raw_zmq_lanes_gbps']:.2f} GB/s the same, over {lanes} connections")]
            if lanes > 1
            else []
        ),
        ("fedbus", f"{fedbus_gbps:.2f} GB/s ({fb['elapsed']:.3f} s), {result['ratio']:.0%} of raw"),
        ("runs", f"{repeat}, fedbus / raw in each: {', '.join(f'{r:.0%}' for r in result['ratios'])} (median shown)"),
        (
            "fedbus warm",
            f"{result['fedbus_warm_gbps']:.2f} GB/s into a reused receive buffer, {result['warm_ratio']:.0%} of raw",
        ),
        *([("device to file", f"{result['d2h_gbps']:.2f} GB/s ({fb['d2h']:.3f} s of fedbus_s)")] if fb["d2h"] else []),
        *([("received to device", f"{result['h2d_gbps']:.2f} GB/s ({fb['h2d']:.3f} s)")] if "h2d" in fb else []),
        ("memcpy", f"{mem:.2f} GB/s"),
        *(
            (f"{side} cpu (cold)", ", ".join(f"{k} {v:.2f} s" for k, v in fb[key].items()))
            for side, key in (("sender", "sender_cpu"), ("receiver", "cpu"))
        ),
        (
            "cpu s / GiB",
            "fedbus {fedbus[total]:.2f} (sender {fedbus[sender]:.2f}, receiver {fedbus[receiver]:.2f}); raw zmq "
            "{raw_zmq[total]:.2f} (sender {raw_zmq[sender]:.2f}, receiver {raw_zmq[receiver]:.2f})".format(
                **result["cpu_s_per_gib"]
            ),
        ),
        ("sender rss", f"{result['sender_rss_x']:.2f} x model"),
        ("receiver rss", f"{result['receiver_rss_x']:.2f} x model"),
    ]
    return format_report(rows, result)


def _cpu_per_gib(fb: dict[str, Any], raw_cpu: dict[str, float]) -> dict[str, Any]:
    """CPU seconds per GiB moved, fedbus's (cold send) beside raw ZeroMQ's (the cache-hot ceiling run): each side,
    both together, and fedbus's by thread kind (``main`` the event loop, ``zmq_io``, ``other`` placement and
    digest threads). A device model's sender figure includes the copy into the hand-over file."""
    sender, receiver = fb["sender_cpu"], fb["cpu"]
    fedbus = {"sender": sum(sender.values()), "receiver": sum(receiver.values())}
    fedbus["total"] = fedbus["sender"] + fedbus["receiver"]
    raw = {**raw_cpu, "total": raw_cpu["sender"] + raw_cpu["receiver"]}
    threads = {"sender": sender, "receiver": receiver}
    return per_gib({"fedbus": fedbus, "raw_zmq": raw, "fedbus_threads": threads}, fb["size"])


if __name__ == "__main__":
    receiver_main(
        sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
    )
