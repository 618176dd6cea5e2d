"""Fixed-point encoding of an update into the ring of integers mod 2^bits, and back.

What a site masks is one vector: every floating tensor of its update, in the order of their sorted names,
flattened, then one more element for its weight. Each value is clipped to [-clip, clip] and scaled by
``scale = floor((2^(bits-1) - 1) / (n * max(clip, 1)))`` (n: the sites of the round's roster), rounded to the
nearest integer and taken mod 2^bits. The sum of n such values stays inside (-2^(bits-1), 2^(bits-1)), so the
ring's sum, read as a signed integer and divided by ``scale``, is the true sum of the clipped values within
``n / (2 * scale)`` (each value is off by at most half a step, ``1 / (2 * scale)``): the precision the job
states. With bits = 32, clip = 8 and 4 sites the step is 2^-26 (1.5e-8), finer than float32's at 1.0. With
bits = 64 the step is far below float64's own rounding, which is then what limits the precision (about 2^-52
of clip x n).

Weights (FedAvg's sample counts): with ``max_weight`` set, a site sends ``r * x`` and ``r`` with
``r = min(weight, max_weight) / max_weight`` (so r is in [0, 1] and r * x stays within the clip), and the broker
divides the unmasked sums: sum(r_i x_i) / sum(r_i), FedAvg's weighted mean with weights capped at
``max_weight``. Without it every site has r = 1: the plain mean. Either way the weights travel masked; the
result's plaintext ``weight`` is sent as 1.

Integer tensors (counters such as ``num_batches_tracked``) are not part of the vector: they never leave the
site, and the broker keeps the global model's values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedbus.errors import ConfigError

_CHUNK = 1 << 20


def ring_dtype(bits: int) -> type[np.unsignedinteger]:
    """The numpy word of the ring mod 2^bits: uint32 or uint64."""
    if bits == 32:
        return np.uint32
    if bits == 64:
        return np.uint64
    raise ConfigError(f"secure_aggregation.bits must be 32 or 64, got {bits!r}")


def scale_for(bits: int, clip: float, sites: int) -> float:
    """The fixed-point scale: the sum of ``sites`` values in [-clip, clip] (and weights in [0, 1]) fits."""
    return float(((1 << (bits - 1)) - 1) // int(np.ceil(sites * max(clip, 1.0))))


def float_names(params: Mapping[str, object]) -> list[str]:
    """The names of the floating tensors of ``params``, in the order the masked vector lays them out."""
    return sorted(n for n, t in params.items() if _is_float(t))


def _is_float(t: object) -> bool:
    dtype = getattr(t, "dtype", None)
    return bool(getattr(dtype, "is_floating_point", False)) or (
        isinstance(dtype, np.dtype) and np.issubdtype(dtype, np.floating)
    )


def encode(arrays: Sequence[np.ndarray], ratio: float, *, bits: int, clip: float, scale: float) -> np.ndarray:
    """The vector of ``arrays`` (flattened, in order) times ``ratio``, then ``ratio``, in the ring.

    Four passes over each block of ``_CHUNK`` values, in float64: scale (``ratio x scale`` at once), clip to
    ``clip x scale``, round, and store as signed words of the ring's width (two's complement: mod 2^bits)."""
    dtype = ring_dtype(bits)
    signed = np.int32 if bits == 32 else np.int64
    total = sum(a.size for a in arrays) + 1
    out = np.empty(total, dtype=dtype)
    words = out.view(signed)
    factor, limit = ratio * scale, clip * scale
    work = np.empty(min(_CHUNK, total), dtype=np.float64)
    off = 0
    for a in arrays:
        flat = a.reshape(-1)
        for i in range(0, flat.size, _CHUNK):
            part = flat[i : i + _CHUNK]
            y = work[: part.size]
            np.multiply(part, factor, out=y, dtype=np.float64)
            np.clip(y, -limit, limit, out=y)
            np.rint(y, out=y)
            np.copyto(words[off + i : off + i + part.size], y, casting="unsafe")  # |y| < 2^(bits-1): exact
        off += flat.size
    words[off] = round(ratio * scale)
    return out


def decode(ring_sum: np.ndarray, *, scale: float) -> np.ndarray:
    """The float64 values of a sum in the ring (read as signed integers), over ``scale``."""
    signed = ring_sum.view(np.int32 if ring_sum.dtype == np.uint32 else np.int64)
    return signed.astype(np.float64) / scale
