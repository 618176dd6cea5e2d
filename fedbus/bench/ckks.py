"""``fedbus bench ckks``: CKKS parameter candidates for encrypted jobs, speed against precision.

For each candidate (poly_modulus_degree, coefficient modulus, scale) the bench encrypts ``values`` random
float32 values (N(0, 1), a model's order of magnitude) as a site does (``fedbus.he.codec``), folds ``sites``
such updates with FedAvg weights 1..sites on the broker's keyless context (``fedbus.he.fold``), and decrypts
the result. Figures per million values, one thread (TenSEAL holds the GIL): ``encrypt_s`` (a site, per
update), ``fold_s`` (the broker, per update: load, check, scale, add), ``decrypt_s`` (a site, the global
model), ``up_bytes`` / ``down_bytes`` per value (an update; the aggregate), and ``max_error``, the largest
absolute error of the decrypted weighted mean. docs/security.md reads them and says why the default is what
it is.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fedbus.bench.common import format_report

CANDIDATES: list[tuple[int, tuple[int, ...], int]] = [
    (8192, (60, 40, 60), 40),
    (8192, (60, 30, 60), 30),
    (8192, (40, 21, 40), 21),
    (16384, (60, 40, 60), 40),
    (16384, (60, 50, 60), 50),
]
"""(poly_modulus_degree, coeff_mod_bit_sizes, scale_bits); the first is fedbus's default (CkksParams)."""


def measure(degree: int, bits: tuple[int, ...], scale: int, values: int, sites: int) -> dict[str, Any]:
    """One candidate's figures (see the module docstring)."""
    from fedbus.he.codec import decrypt_params, encrypt_params
    from fedbus.he.context import CkksParams, broker_bytes, from_bytes, new_site_context
    from fedbus.he.fold import CipherFold, plain_spec
    from fedbus.he.options import HEOptions

    ctx = new_site_context(CkksParams(degree, bits, scale))
    pub = from_bytes(broker_bytes(ctx), "bench")
    g = torch.Generator().manual_seed(0)
    updates = [{"w": torch.randn(values, generator=g)} for _ in range(sites)]
    fold = CipherFold(pub, plain_spec(updates[0]), frozenset({"w"}))
    t_enc = t_fold = 0.0
    up = 0
    for i, u in enumerate(updates):
        t = time.perf_counter()
        enc = encrypt_params(ctx, u, HEOptions())
        t_enc += time.perf_counter() - t
        up += enc["w"].numel()
        t = time.perf_counter()
        reason = fold.check("w", enc["w"])
        assert reason is None, reason
        fold.add(enc, (i + 1) / 1.0)
        t_fold += time.perf_counter() - t
    total = sites * (sites + 1) / 2
    result = fold.result(1.0 / total)
    t = time.perf_counter()
    got = decrypt_params(ctx, result)["w"]
    t_dec = time.perf_counter() - t
    want = sum((i + 1) * u["w"].double() for i, u in enumerate(updates)) / total
    per_m = 1e6 / values
    return {
        "poly_modulus_degree": degree,
        "coeff_mod_bit_sizes": list(bits),
        "scale_bits": scale,
        "encrypt_s": round(t_enc / sites * per_m, 3),
        "fold_s": round(t_fold / sites * per_m, 3),
        "decrypt_s": round(t_dec * per_m, 3),
        "up_bytes": round(up / sites / values, 1),
        "down_bytes": round(result["w"].numel() / values, 1),
        "max_error": float(f"{float((got.double() - want).abs().max()):.2e}"),
    }


def run_ckks(values: int = 262144, sites: int = 4) -> str:
    """Every candidate measured; the report (a table, then one JSON line)."""
    rows: list[tuple[str, Any]] = []
    figures = []
    for degree, bits, scale in CANDIDATES:
        f = measure(degree, bits, scale, values, sites)
        figures.append(f)
        rows.append(
            (
                f"N={degree} q={list(bits)} scale=2^{scale}",
                f"encrypt {f['encrypt_s']:.2f} s/M, fold {f['fold_s']:.2f} s/M/update, decrypt {f['decrypt_s']:.2f}"
                f" s/M, {f['up_bytes']:.0f} B/value up, {f['down_bytes']:.0f} down, max error {f['max_error']:.1e}",
            )
        )
    return format_report(rows, {"values": values, "sites": sites, "candidates": figures})
