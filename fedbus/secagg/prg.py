"""The pseudo-random generator that expands a 32-byte seed into a mask of n ring elements.

Masks are the ChaCha20 key stream (the ``cryptography`` package: OpenSSL), read as little-endian unsigned words
of the ring's width. ChaCha20 is a stream cipher: its key stream is a PRG under the standard assumption about
ChaCha, which is what the masks' secrecy rests on, and it is fast without AES hardware (on machines with AES-NI,
AES-256-CTR is as good a choice). Each seed is used for one mask of one round (seeds are fresh per round), so the
nonce is fixed and the block counter starts at zero. A mask is made and added a block of ``_BLOCK`` words at a
time, so its memory beside the vector it is added to stays small.

``fedbus bench prg`` measures the candidates on the machine at hand (ChaCha20, AES-256-CTR, and numpy's Philox
and PCG64); the non-cryptographic generators are listed for speed only: their outputs can be predicted from a
sample, so a mask drawn from them would not hide an update.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_BLOCK = 1 << 20  # words per block: bounds the memory a mask takes beside its target
_ZEROS = memoryview(bytes(_BLOCK * 8))  # what the cipher encrypts: shared, read-only


def expand(seed: bytes, n: int, dtype: type[np.unsignedinteger] = np.uint32) -> np.ndarray:
    """``n`` pseudo-random words of ``dtype`` (uint32 or uint64) from ``seed`` (the ChaCha20 key stream)."""
    out = np.zeros(n, dtype=dtype)
    add_mask(out, seed)
    return out


def add_mask(acc: np.ndarray, seed: bytes, sign: int = 1) -> None:
    """``acc += sign * expand(seed)`` in the ring of ``acc``'s width (wrapping), in place, a block at a time."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    scratch = np.empty(min(_BLOCK, acc.size), dtype=acc.dtype)
    enc = Cipher(algorithms.ChaCha20(seed, bytes(16)), None).encryptor()  # OpenSSL's IV: counter 0, nonce 0
    for off in range(0, acc.size, scratch.size):
        part = acc[off : off + scratch.size]
        mask = scratch[: part.size]
        enc.update_into(_ZEROS[: mask.nbytes], _bytes(mask))
        if sign > 0:
            np.add(part, mask, out=part)
        else:
            np.subtract(part, mask, out=part)


def _bytes(words: np.ndarray) -> memoryview:
    """A writable byte view of ``words`` (for the cipher to write into)."""
    return memoryview(words.view(np.uint8))  # type: ignore[arg-type]  # numpy's stubs: ndarray is a buffer


def candidates() -> dict[str, Callable[[bytes, int], np.ndarray]]:
    """Generators of ``n`` uint32 words from a 32-byte seed, by name: what ``fedbus bench prg`` times."""

    def philox(seed: bytes, n: int) -> np.ndarray:
        bg = np.random.Philox(key=np.frombuffer(seed[:16], np.uint64))
        return bg.random_raw((n + 1) // 2).view(np.uint32)[:n]

    def pcg64(seed: bytes, n: int) -> np.ndarray:
        bg = np.random.PCG64(int.from_bytes(seed, "little"))
        return bg.random_raw((n + 1) // 2).view(np.uint32)[:n]

    def aes256_ctr(seed: bytes, n: int) -> np.ndarray:
        out = np.empty(n, np.uint32)
        enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        enc.update_into(bytes(out.nbytes), _bytes(out))
        return out

    return {
        "chacha20 (fedbus)": expand,
        "aes256-ctr": aes256_ctr,
        "philox (not a CSPRNG)": philox,
        "pcg64 (not a CSPRNG)": pcg64,
    }
