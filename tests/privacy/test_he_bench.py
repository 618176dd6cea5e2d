"""``fedbus bench ckks`` at a tiny size reports every figure it promises (not speed)."""

from __future__ import annotations

import json

import pytest

from fedbus.bench import ckks
from tests.privacy.helpers import ts  # noqa: F401  (skips without TenSEAL)

pytestmark = pytest.mark.timeout(60)


def test_bench_ckks_reports_speed_and_precision_of_each_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckks, "CANDIDATES", ckks.CANDIDATES[:2])
    out = json.loads(ckks.run_ckks(values=5000, sites=2).splitlines()[-1])
    first, second = out["candidates"]
    assert (first["poly_modulus_degree"], first["coeff_mod_bit_sizes"], first["scale_bits"]) == (8192, [60, 40, 60], 40)
    for c in (first, second):
        assert c["encrypt_s"] > 0 and c["fold_s"] > 0 and c["decrypt_s"] > 0
        assert c["up_bytes"] > c["down_bytes"] > 4  # a fresh ciphertext, then the rescaled aggregate: both > float32
    assert first["max_error"] < 1e-5 < second["max_error"]  # scale 2^40 against 2^30
