"""The pseudo-random generator that expands a 32-byte seed into a mask of n ring elements.

Masks are the AES-256 key stream in counter mode (the ``cryptography`` package: OpenSSL, with AES-NI where the
CPU has it), read as little-endian unsigned words of the ring's width. AES-CTR is a PRG under the standard
assumption that AES is a pseudo-random permutation, which is what the masks' secrecy rests on. Each seed is used
for one mask of one round (seeds are fresh per round), so the counter starts at block zero. A mask is made and
added a block of ``_BLOCK`` words at a time, so its memory beside the vector it is added to stays small.
ChaCha20 is as good a PRG and the choice on CPUs without AES instructions; with them AES-CTR was about twice
as fast here (docs/benchmarks.md).

``fedbus bench prg`` measures the candidates on the machine at hand (AES-256-CTR, ChaCha20, and numpy's Philox
and PCG64); the non-cryptographic generators are listed for speed only: their outputs can be predicted from a
sample, so a mask drawn from them would not hide an update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_BLOCK = 1 << 18  # words per block: bounds the memory a mask takes beside its target, and stays in cache
_ZEROS = memoryview(bytes(_BLOCK * 8))  # what the cipher encrypts: shared, read-only


def expand(seed: bytes, n: int, dtype: type[np.unsignedinteger] = np.uint32) -> np.ndarray:
    """``n`` pseudo-random words of ``dtype`` (uint32 or uint64) from ``seed`` (the AES-256-CTR key stream)."""
    out = np.zeros(n, dtype=dtype)
    add_mask(out, seed)
    return out


def add_mask(acc: np.ndarray, seed: bytes, sign: int = 1) -> None:
    """``acc += sign * expand(seed)`` in the ring of ``acc``'s width (wrapping), in place, a block at a time."""
    add_masks(acc, [(seed, sign)])


def add_masks(acc: np.ndarray, masks: Sequence[tuple[bytes, int]]) -> None:
    """Add (sign +1) or subtract (-1) the mask of every seed of ``masks`` into ``acc``, in place. Block by block,
    every mask's next block in turn: a block of ``acc`` is read and written while it is in cache, once per mask."""
    for seed, _ in masks:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    if not masks or acc.size == 0:
        return
    scratch = np.empty(min(_BLOCK, acc.size), dtype=acc.dtype)
    ciphers = [(Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor(), sign) for seed, sign in masks]
    for off in range(0, acc.size, scratch.size):  # counter block 0 for every seed: one seed, one mask
        part = acc[off : off + scratch.size]
        mask = scratch[: part.size]
        for enc, sign in ciphers:
            enc.update_into(_ZEROS[: mask.nbytes], _bytes(mask))
            if sign > 0:
                np.add(part, mask, out=part)
            else:
                np.subtract(part, mask, out=part)


def _bytes(words: np.ndarray) -> memoryview:
    """A writable byte view of ``words`` (for the cipher to write into)."""
    return memoryview(words.view(np.uint8))  # type: ignore[arg-type]  # numpy's stubs: ndarray is a buffer


def candidates() -> dict[str, Callable[[bytes, np.ndarray], None]]:
    """Each mask generator as it is used: the mask of a 32-byte seed added into a uint32 array, a block of
    ``_BLOCK`` words at a time; what ``fedbus bench prg`` times. fedbus's own is AES-256-CTR (``add_mask``)."""

    def with_blocks(fill: Callable[[np.ndarray], object]) -> Callable[[np.ndarray], None]:
        def add(out: np.ndarray) -> None:
            scratch = np.empty(min(_BLOCK, out.size), np.uint32)
            for off in range(0, out.size, _BLOCK):
                part = out[off : off + _BLOCK]
                fill(scratch[: part.size])
                np.add(part, scratch[: part.size], out=part)

        return add

    def aes256_ctr(seed: bytes, out: np.ndarray) -> None:
        add_mask(out, seed)

    def chacha20(seed: bytes, out: np.ndarray) -> None:
        enc = Cipher(algorithms.ChaCha20(seed, bytes(16)), None).encryptor()
        with_blocks(lambda block: enc.update_into(_ZEROS[: block.nbytes], _bytes(block)))(out)

    def philox(seed: bytes, out: np.ndarray) -> None:
        bg = np.random.Philox(key=np.frombuffer(seed[:16], np.uint64))
        with_blocks(lambda block: np.copyto(block, bg.random_raw((block.size + 1) // 2).view(np.uint32)[: block.size]))(
            out
        )

    def pcg64(seed: bytes, out: np.ndarray) -> None:
        bg = np.random.PCG64(int.from_bytes(seed, "little"))
        with_blocks(lambda block: np.copyto(block, bg.random_raw((block.size + 1) // 2).view(np.uint32)[: block.size]))(
            out
        )

    return {
        "aes256-ctr (fedbus)": aes256_ctr,
        "chacha20": chacha20,
        "philox (not a CSPRNG)": philox,
        "pcg64 (not a CSPRNG)": pcg64,
    }
