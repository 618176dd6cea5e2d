"""``fedbus bench round --secagg`` and ``fedbus bench prg``: what secure aggregation costs.

``run_secagg_round`` runs ``fedbus bench round`` twice in one go, plaintext FedAvg and then the same job with
``secure_aggregation = {threshold = T, clip = 8.0}`` (T: the sites minus one, at least 2), and reports both
with their ratios: ``round_x`` (median round seconds, secure over plain), ``broker_rss_x`` of each, and the bytes
of model traffic per round. A masked upload is one int32 word per floating element plus one (the weight), the
same bytes as a float32 model; the protocol's own messages (keys, encrypted shares, reveals) are about
``n^2 x 200`` bytes a round and are counted in ``secagg_control_bytes``.

``run_prg`` times the mask generators on this machine (``fedbus.secagg.prg.candidates``), each filling the
same ``size_mb`` of words: seconds and GB/s, the best of five.
"""

from __future__ import annotations

import json
import time

from fedbus.bench.common import format_report
from fedbus.bench.round import run_round

_WORD = 4


def _figures(report: str) -> dict:
    return json.loads(report.strip().splitlines()[-1])


def run_secagg_round(size_mb: float, sites: int, rounds: int = 4, threshold: int | None = None) -> str:
    """Plaintext FedAvg, then FedAvg with secure aggregation, on the same daemons' setup; both reports."""
    t = threshold or max(2, sites - 1)
    plain = _figures(run_round(size_mb, sites, rounds, "fedavg"))
    extra = f"secure_aggregation = {{threshold = {t}, clip = 8.0}}\n"
    secure = _figures(run_round(size_mb, sites, rounds, "fedavg", strategy_extra=extra))
    control = sites * (64 + 2 * 32 * sites + 160 * (sites - 1) * 2 + 2 * 70 * sites)  # advert, roster, shares, reveal
    out = {
        "size_mb": size_mb,
        "sites": sites,
        "rounds": rounds,
        "threshold": t,
        "plain": plain,
        "secagg": secure,
        "round_x": round(secure["round_s"] / plain["round_s"], 3),
        "bytes_per_round_plain": plain["bytes_per_round"],
        "bytes_per_round_secagg": secure["bytes_per_round"] + sites * _WORD,
        "secagg_control_bytes": control,
    }
    rows = [
        ("model / sites", f"{size_mb} MiB x {sites} sites, {rounds} rounds of fedavg, threshold {t}"),
        ("plain round", f"median {plain['round_s']:.3f} s ({', '.join(f'{x:.3f}' for x in plain['round_s_all'])})"),
        ("secagg round", f"median {secure['round_s']:.3f} s ({', '.join(f'{x:.3f}' for x in secure['round_s_all'])})"),
        ("secagg / plain", f"{out['round_x']:.2f} x"),
        ("broker rss", f"plain {plain['broker_rss_x']:.2f} x model, secagg {secure['broker_rss_x']:.2f} x model"),
        (
            "bytes per round",
            f"plain {plain['bytes_per_round'] / 1e6:.1f} MB, secagg {out['bytes_per_round_secagg'] / 1e6:.1f} MB"
            f" + {control / 1e3:.1f} kB of protocol messages",
        ),
        ("cpu per round", f"plain {plain['cpu_s_per_round']}, secagg {secure['cpu_s_per_round']}"),
    ]
    return format_report(rows, out)


def run_prg(size_mb: float = 100.0) -> str:
    """Seconds and GB/s of each mask generator for ``size_mb`` MiB of uint32 words, best of five."""
    import numpy as np

    from fedbus.secagg import prg

    n = int(size_mb * (1 << 20)) // _WORD
    seed = bytes(range(32))
    words = np.zeros(n, np.uint32)  # touched once: page faults are not the generators' cost
    out: dict[str, dict[str, float]] = {}
    for name, gen in prg.candidates().items():
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            gen(seed, words)
            best = min(best, time.perf_counter() - t0)
        out[name] = {"s": round(best, 4), "gbps": round(n * _WORD / best / 1e9, 3)}
    rows = [(name, f"{f['s']:.3f} s for {size_mb:g} MiB, {f['gbps']:.2f} GB/s") for name, f in out.items()]
    return format_report(rows, {"size_mb": size_mb, "generators": out})
