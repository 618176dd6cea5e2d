"""Shared pieces of the homomorphic-encryption tests: TenSEAL or a skip, a small context, byte searches."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
import torch

ts = pytest.importorskip("tenseal", reason="homomorphic encryption needs the he extra: pip install 'fedbus[he]'")

WINDOW = 16
"""float32 values in a searched run: 64 bytes, which never occur by chance in other bytes."""


def site_context() -> Any:
    """A fresh project context (poly_modulus_degree 8192: quick) with its secret key."""
    from fedbus.he.context import new_site_context

    return new_site_context()


def broker_context(ctx: Any) -> Any:
    """The broker's part of ``ctx``: parameters, no key."""
    from fedbus.he.context import broker_bytes, from_bytes

    return from_bytes(broker_bytes(ctx), "test")


def windows(t: torch.Tensor, count: int = 8) -> list[bytes]:
    """``count`` runs of WINDOW float32 values spread over ``t``: what must never be found in plaintext."""
    flat = t.detach().reshape(-1).to(torch.float32).contiguous()
    step = max(1, (flat.numel() - WINDOW) // count)
    return [flat[i : i + WINDOW].numpy().tobytes() for i in range(0, flat.numel() - WINDOW + 1, step)][:count]


def found(patterns: Iterable[bytes], haystack: bytes | bytearray) -> list[int]:
    """Indices of the patterns that occur in ``haystack``."""
    return [i for i, p in enumerate(patterns) if bytes(haystack).find(p) >= 0]
