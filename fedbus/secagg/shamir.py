"""Shamir secret sharing (t of n) of 32-byte secrets over the prime field GF(2^521 - 1).

A secret (a self-mask seed or an X25519 private key, 32 bytes) is the constant term of a random polynomial of
degree t - 1; the share of the site at position ``x`` (1 ... n, its place in the round's roster) is the
polynomial's value there, 66 bytes big-endian. Any t shares give the secret back by Lagrange interpolation at 0;
fewer say nothing about it (every value of the secret is equally likely). The field is a Mersenne prime larger
than any 32-byte secret, so a secret is one field element. Python integers do the arithmetic: a round shares two
secrets per site with every other site, a few thousand small multiplications.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from fedbus.errors import RemoteProtocolError

PRIME = (1 << 521) - 1
SHARE_BYTES = 66
SECRET_BYTES = 32


def split(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """Shares of ``secret`` for positions 1 ... ``count``; any ``threshold`` of them rebuild it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a shared secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= count:
        raise ValueError(f"threshold must be in 1 ... {count}, got {threshold}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = []
    for x in range(1, count + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out.append(y.to_bytes(SHARE_BYTES, "big"))
    return out


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from ``threshold`` or more shares, by position; RemoteProtocolError when they cannot be one."""
    if len(shares) < threshold:
        raise RemoteProtocolError(f"{len(shares)} shares cannot rebuild a secret shared {threshold} of n")
    points = []
    for x, share in sorted(shares.items())[:threshold]:
        if len(share) != SHARE_BYTES or x < 1:
            raise RemoteProtocolError(f"share at position {x}: {len(share)} bytes, expected {SHARE_BYTES}")
        y = int.from_bytes(share, "big")
        if y >= PRIME:
            raise RemoteProtocolError(f"share at position {x} is not a field element")
        points.append((x, y))
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >> (8 * SECRET_BYTES):
        raise RemoteProtocolError("the shares do not rebuild a 32-byte secret: some are corrupt")
    return secret.to_bytes(SECRET_BYTES, "big")
