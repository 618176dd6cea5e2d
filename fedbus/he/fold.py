"""The broker's side: a running sum of encrypted updates with public coefficients, never decrypted.

``CipherFold`` folds one update at a time, as the plaintext fold does (``fedbus.strategy.aggregate``): each
ciphertext of each blob is loaded, multiplied by the update's coefficient (a public scalar: FedAvg's weight,
FedBuff's staleness weight times the server step) and added to the one running ciphertext at its place. What
the fold holds is the aggregate alone: one ciphertext per ``slots`` values of the model, whatever the number of
updates; the update is read from its (spooled) blob and dropped ciphertext by ciphertext.

``result(factor, base)`` is the next global model's blobs: the sum, with ``factor`` recorded in each blob (the
site multiplies the decrypted values by it: FedAvg's 1 / total weight, which a ciphertext cannot be divided
by), plus ``base`` when given (FedBuff: global + step; the base is a blob of factor 1, or plaintext at first).
Every ciphertext stays at CKKS depth 1: one scalar product per update, additions otherwise.

The fold is pure: no IO, no clock. A blob's header is checked first (:meth:`CipherFold.check`); its ciphertexts
are loaded only once, while folding, and one that TenSEAL refuses makes :meth:`CipherFold.add` take back what
it added of that update and raise :class:`BlobError`: an update is folded whole or not at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from fedbus.he import blob
from fedbus.he.blob import BlobError
from fedbus.he.context import slots, tenseal

Spec = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]


def plain_spec(model: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Names -> (dtype, shape) of the plaintext model that ``model`` (blobs or tensors) is or encrypts."""
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name, t in model.items():
        if blob.is_blob(t):
            b = blob.parse(t)
            out[name] = (b.dtype, b.shape)
        else:
            out[name] = (t.dtype, tuple(t.shape))
    return out


class CipherFold:
    """Σ coef · blob over the encrypted tensors ``encrypted`` of a model described by ``spec``."""

    def __init__(self, ctx: Any, spec: Spec, encrypted: frozenset[str]) -> None:
        self.ctx = ctx
        self.spec = dict(spec)
        self.encrypted = encrypted
        self.slots = slots(ctx)
        self.count = 0
        self._acc: dict[str, list[Any]] = {}  # per encrypted name, its running ciphertexts in order

    def check(self, name: str, t: torch.Tensor) -> str | None:
        """Why ``t`` cannot be folded as the encrypted tensor ``name``, or None: a blob of the spec's dtype and
        shape at this context's slots. The ciphertexts themselves are loaded (and refused) by :meth:`add`."""
        try:
            b = blob.parse(t)
        except BlobError as exc:
            return f"{name!r}: {exc}"
        dtype, shape = self.spec[name]
        if (b.dtype, b.shape) != (dtype, shape):
            return f"{name!r} encrypts {b.dtype} {list(b.shape)}, expected {dtype} {list(shape)}"
        if b.slots != self.slots or b.factor != 1.0:
            return f"{name!r}: an update's blob must have {self.slots} slots and factor 1"
        return None

    def add(self, params: Mapping[str, torch.Tensor], coef: float) -> None:
        """Fold ``coef * params`` for the encrypted names (blobs :meth:`check` passed), or nothing: a ciphertext
        that TenSEAL refuses, or that holds the wrong number of values, raises BlobError after the terms already
        added are subtracted again (exactly: the same product of the same ciphertext, in modular arithmetic)."""
        done: list[tuple[str, int]] = []
        try:
            for name in sorted(self.encrypted):
                b = blob.parse(params[name])
                acc = self._acc.setdefault(name, [None] * len(b.sizes))
                for i, v in enumerate(self._vectors(b, name)):
                    want = min(self.slots, b.numel - i * self.slots)
                    if v.size() != want:
                        raise BlobError(f"{name!r}: ciphertext {i} holds {v.size()} values, expected {want}")
                    try:  # a ciphertext at another scale or level than the sum's: TenSEAL refuses the product or sum
                        term = v * coef
                        acc[i] = term if acc[i] is None else acc[i] + term
                    except Exception as exc:  # TenSEAL raises ValueError or RuntimeError
                        raise BlobError(f"{name!r}: ciphertext {i} does not fold with the sum: {exc}") from None
                    done.append((name, i))
        except BlobError:
            self._undo(params, coef, done)
            raise
        self.count += 1

    def _undo(self, params: Mapping[str, torch.Tensor], coef: float, done: list[tuple[str, int]]) -> None:
        """Take back the terms ``add`` folded before it failed (the sum is empty again if it was)."""
        if self.count == 0:
            self._acc.clear()
            return
        folded = set(done)
        for name in dict.fromkeys(n for n, _ in done):
            acc = self._acc[name]
            for i, v in enumerate(self._vectors(blob.parse(params[name]), name)):
                if (name, i) not in folded:
                    break
                acc[i] = acc[i] - v * coef

    def result(self, factor: float, base: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The next global model's blobs: each holds the sum, plus ``base`` when given (FedBuff), and ``factor``
        for the site to apply after decrypting (FedAvg). The fold is empty afterwards."""
        out: dict[str, torch.Tensor] = {}
        for name in self.encrypted:
            acc = self._acc.pop(name)
            if base is not None:
                self._add_base(name, acc, base[name])
            dtype, shape = self.spec[name]
            out[name] = blob.pack(dtype, shape, self.slots, factor, [v.serialize() for v in acc])
        self.count = 0
        return out

    def clear(self) -> None:
        """Drop a partial sum (a round or buffer that ended without an aggregate)."""
        self._acc.clear()
        self.count = 0

    def held(self) -> Iterator[bytes]:
        """What the fold holds, serialized: every running ciphertext (for inspection: nothing else is kept)."""
        for acc in self._acc.values():
            for v in acc:
                yield bytes(v.serialize())

    def _add_base(self, name: str, acc: list[Any], t: torch.Tensor) -> None:
        if blob.is_blob(t):
            b = blob.parse(t)
            if b.factor != 1.0 or len(b.sizes) != len(acc):
                raise BlobError(f"{name!r}: the base model's blob does not match the fold")
            for i, v in enumerate(self._vectors(b, name)):
                acc[i] += v
            return
        flat = t.detach().reshape(-1).to(torch.float64).numpy()
        for i in range(len(acc)):
            acc[i] += flat[i * self.slots : (i + 1) * self.slots].tolist()

    def _vectors(self, b: blob.Blob, name: str) -> Iterator[Any]:
        """The ciphertexts of ``b``, loaded one at a time (each is dropped once the caller moves on)."""
        ts = tenseal()
        for i, ct in enumerate(b.ciphertexts()):
            try:
                yield ts.ckks_vector_from(self.ctx, bytes(ct))
            except Exception as exc:  # TenSEAL's parser raises ValueError or RuntimeError
                raise BlobError(f"{name!r}: ciphertext {i} is not one of this context's: {exc}") from None
