"""An encrypted tensor as one uint8 tensor: the ciphertexts of its values, and what rebuilds it.

Why a byte tensor: a model whose floating tensors are ciphertexts is still a safetensors file of the same
names, so it takes the ordinary chunked, resumable streams, spool files and checkpoints, and the broker's
offer check still names every tensor. The layout of a blob::

    b"FBCKKS\\x00\\x01"  u32 (little-endian) header length  header (UTF-8 JSON)  zero padding to 8  ciphertexts

The header holds ``dtype`` and ``shape`` (the plaintext tensor's), ``slots`` (values per ciphertext: the
context's poly_modulus_degree / 2), ``factor`` (the decrypted values times it are the tensor: the broker's
FedAvg leaves the division by the total weight to the site, as a ciphertext cannot be divided) and ``sizes``
(each serialized TenSEAL CKKS vector's length, in order: the tensor's values flattened, ``slots`` at a time).
Every field of a blob from the network is checked (:func:`parse`) before any ciphertext is read.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

MAGIC = b"FBCKKS\x00\x01"
_HEAD = struct.Struct("<I")
MAX_HEADER = 16 << 20
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_NAMES = {v: k for k, v in DTYPES.items()}


class BlobError(ValueError):
    """A blob's bytes do not describe an encrypted tensor (the message says what is wrong)."""


@dataclass(frozen=True)
class Blob:
    """A parsed blob: the plaintext tensor's description and its ciphertexts, views of the blob's bytes."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    slots: int
    factor: float
    data: memoryview
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def ciphertexts(self) -> Iterator[memoryview]:
        """Each serialized CKKS vector in order (views: no copy)."""
        at = 0
        for n in self.sizes:
            yield self.data[at : at + n]
            at += n


def count(numel: int, slots: int) -> int:
    """How many ciphertexts hold ``numel`` values at ``slots`` a ciphertext."""
    return max(1, -(-numel // slots))


def is_blob(t: torch.Tensor) -> bool:
    """Whether ``t`` looks like a blob (a 1-D uint8 tensor starting with the magic); :func:`parse` checks it."""
    if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() < len(MAGIC) + _HEAD.size:
        return False
    return bytes(t[: len(MAGIC)].numpy()) == MAGIC


def pack(
    dtype: torch.dtype, shape: Sequence[int], slots: int, factor: float, ciphertexts: Sequence[bytes]
) -> torch.Tensor:
    """The blob of ``ciphertexts`` (serialized CKKS vectors) encrypting a tensor of ``dtype`` and ``shape``."""
    head = json.dumps(
        {
            "dtype": _NAMES[dtype],
            "shape": list(shape),
            "slots": slots,
            "factor": factor,
            "sizes": [len(c) for c in ciphertexts],
        },
        separators=(",", ":"),
    ).encode()
    start = -(-(len(MAGIC) + _HEAD.size + len(head)) // 8) * 8
    out = np.zeros(start + sum(len(c) for c in ciphertexts), dtype=np.uint8)
    out[: len(MAGIC)] = np.frombuffer(MAGIC, dtype=np.uint8)
    out[len(MAGIC) : len(MAGIC) + _HEAD.size] = np.frombuffer(_HEAD.pack(len(head)), dtype=np.uint8)
    out[len(MAGIC) + _HEAD.size : len(MAGIC) + _HEAD.size + len(head)] = np.frombuffer(head, dtype=np.uint8)
    at = start
    for c in ciphertexts:
        out[at : at + len(c)] = np.frombuffer(c, dtype=np.uint8)
        at += len(c)
    return torch.from_numpy(out)


def parse(t: torch.Tensor) -> Blob:
    """The blob in ``t`` (untrusted bytes), every field checked; BlobError says what is wrong."""
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise BlobError(f"an encrypted tensor must be a 1-D uint8 tensor, got {t.dtype} of shape {list(t.shape)}")
    raw = memoryview(t.detach().contiguous().numpy().data).cast("B")
    fixed = len(MAGIC) + _HEAD.size
    if len(raw) < fixed or bytes(raw[: len(MAGIC)]) != MAGIC:
        raise BlobError("not an encrypted tensor (no CKKS blob header)")
    (n,) = _HEAD.unpack_from(raw, len(MAGIC))
    if n > MAX_HEADER or fixed + n > len(raw):
        raise BlobError(f"blob header of {n} bytes does not fit the blob of {len(raw)} bytes")
    try:
        head = json.loads(bytes(raw[fixed : fixed + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BlobError(f"blob header is not JSON: {exc}") from None
    if not isinstance(head, dict) or set(head) != {"dtype", "shape", "slots", "factor", "sizes"}:
        raise BlobError("blob header must hold exactly dtype, shape, slots, factor and sizes")
    dtype = DTYPES.get(head["dtype"]) if isinstance(head["dtype"], str) else None
    if dtype is None:
        raise BlobError(f"blob dtype must be one of {sorted(DTYPES)}, got {head['dtype']!r}")
    shape, slots, factor, sizes = head["shape"], head["slots"], head["factor"], head["sizes"]
    if not isinstance(shape, list) or len(shape) > 16 or not all(_count(d, 0) for d in shape):
        raise BlobError(f"blob shape must be a list of at most 16 integers >= 0, got {shape!r}")
    if not _count(slots, 1):
        raise BlobError(f"blob slots must be an integer >= 1, got {slots!r}")
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not math.isfinite(factor) or factor <= 0:
        raise BlobError(f"blob factor must be a finite number > 0, got {factor!r}")
    start = -(-(fixed + n) // 8) * 8
    if not isinstance(sizes, list) or not all(_count(s, 1) for s in sizes):
        raise BlobError("blob sizes must be a list of integers >= 1")
    want = count(math.prod(shape), slots)
    if len(sizes) != want:
        raise BlobError(f"{len(sizes)} ciphertexts for {math.prod(shape)} values at {slots} slots, expected {want}")
    if start + sum(sizes) != len(raw):
        raise BlobError(f"blob of {len(raw)} bytes, but its header accounts for {start + sum(sizes)}")
    return Blob(dtype, tuple(shape), slots, float(factor), raw[start:], tuple(sizes))


def _count(v: object, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum
