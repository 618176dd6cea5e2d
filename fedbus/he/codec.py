"""A site's side of encryption: its update's tensors into blobs, the broker's blobs back into tensors.

Only what holds the secret key runs this: encryption (symmetric CKKS) and decryption both need it. A tensor
is flattened and cut into ciphertexts of ``slots`` values each (:mod:`fedbus.he.blob`); the values are
encrypted as float64 and come back as the tensor's own dtype, exact up to CKKS precision (about 1e-6 for
values of order one with the default parameters: docs/security.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedbus.errors import RemoteProtocolError
from fedbus.he import blob
from fedbus.he.context import slots, tenseal
from fedbus.he.options import HEOptions
from fedbus.modelio import serde


def encrypt_tensor(ctx: Any, t: torch.Tensor) -> torch.Tensor:
    """The blob encrypting floating tensor ``t`` under ``ctx`` (which must hold the secret key)."""
    ts = tenseal()
    n = slots(ctx)
    flat = t.detach().reshape(-1).to(torch.float64).numpy()
    cts = [ts.ckks_vector(ctx, flat[i : i + n].tolist()).serialize() for i in range(0, max(len(flat), 1), n)]
    return blob.pack(t.dtype, tuple(t.shape), n, 1.0, cts)


def encrypt_params(ctx: Any, params: Mapping[str, torch.Tensor], options: HEOptions) -> dict[str, torch.Tensor]:
    """``params`` with every tensor ``options`` encrypts replaced by its blob; the others as they are."""
    return {name: encrypt_tensor(ctx, t) if options.encrypts(name, t) else t for name, t in params.items()}


def decrypt_tensor(ctx: Any, t: torch.Tensor) -> torch.Tensor:
    """The tensor blob ``t`` encrypts (its values times the blob's factor); RemoteProtocolError for a bad blob."""
    ts = tenseal()
    try:
        b = blob.parse(t)
    except blob.BlobError as exc:
        raise RemoteProtocolError(f"encrypted tensor: {exc}") from None
    if b.slots != slots(ctx):
        raise RemoteProtocolError(f"encrypted tensor of {b.slots} slots a ciphertext; this context has {slots(ctx)}")
    out = np.empty(b.numel, dtype=np.float64)
    at = 0
    for ct in b.ciphertexts():
        try:
            values = ts.ckks_vector_from(ctx, bytes(ct)).decrypt()
        except Exception as exc:  # TenSEAL's parser raises ValueError or RuntimeError
            raise RemoteProtocolError(f"encrypted tensor: not a ciphertext of this context: {exc}") from None
        take = min(len(values), b.numel - at)
        out[at : at + take] = values[:take]
        at += take
    if at != b.numel:
        raise RemoteProtocolError(f"encrypted tensor: {at} values decrypted, {b.numel} expected")
    if b.factor != 1.0:
        out *= b.factor
    return torch.from_numpy(out).to(b.dtype).reshape(b.shape)


def decrypt_params(ctx: Any, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``params`` with every blob decrypted; plaintext tensors as they are."""
    return {name: decrypt_tensor(ctx, t) if blob.is_blob(t) else t for name, t in params.items()}


def decrypt_file(ctx: Any, path: str | os.PathLike[str], *, max_total: int) -> bool:
    """Decrypt the safetensors file at ``path`` in place (atomically); False when it held no blob (a plaintext
    model, as the first version of a job is)."""
    params = serde.read_file(path, max_total=max_total)
    if not any(blob.is_blob(t) for t in params.values()):
        return False
    plain = decrypt_params(ctx, params)
    tmp = f"{os.fspath(path)}.plain"
    serde.write_file(tmp, serde.layout(plain), durable=False)  # a task's file: a crash loses the task anyway
    os.replace(tmp, path)
    return True
