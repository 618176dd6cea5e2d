"""CKKS contexts: the parameters, the one with the secret key (sites), the one without (broker), their files.

Parameters (:class:`CkksParams`). The broker's fold multiplies each ciphertext by one public scalar and adds
(FedBuff also adds the global model, a ciphertext or, at first, plaintext): multiplicative depth 1, so the
coefficient modulus is one special prime, one level of ``scale_bits`` and a first prime that bounds the
decrypted values: |value| < 2 ** (first - scale_bits - 1), 2**19 with the defaults. FedAvg folds with its
weights divided by the round's first weight (:mod:`fedbus.he.fold`), so a sum stays a few times a model value.
``docs/security.md`` gives the measured speed and precision of the candidates and why the default was chosen.

Keys. A site's context holds the secret key (symmetric CKKS: only key holders encrypt, and they decrypt the
global model); the broker's holds only the parameters: it can load, scale and add ciphertexts, never read
them. Both files are TenSEAL's serialization. :func:`load_site_context` and :func:`load_broker_context` check
them as the CURVE keys are checked: the secret one private to its owner (mode 0600), the broker's holding no
secret key and lying in a folder with no secret context beside it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from fedbus.errors import ConfigError

SITE_FILE = "he_context.secret"
BROKER_FILE = "he_context.public"
INSTALL = "homomorphic encryption needs TenSEAL: pip install 'fedbus[he]'"


def tenseal() -> ModuleType:
    """The ``tenseal`` module, or ConfigError saying how to install it."""
    try:
        import tenseal as ts
    except ImportError as exc:
        raise ConfigError(f"{INSTALL} ({exc})") from None
    return ts


@dataclass(frozen=True)
class CkksParams:
    """A CKKS parameter set (see the module docstring): N = ``poly_modulus_degree``, N / 2 values a ciphertext."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    scale_bits: int = 40

    def __post_init__(self) -> None:
        n, bits, scale = self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.scale_bits
        if n not in (4096, 8192, 16384, 32768):
            raise ConfigError(f"he poly_modulus_degree must be 4096, 8192, 16384 or 32768, got {n!r}")
        if len(bits) < 3 or not all(isinstance(b, int) and 20 <= b <= 60 for b in bits):
            raise ConfigError(f"he coeff_mod_bit_sizes must be 3 or more primes of 20-60 bits, got {list(bits)}")
        if not isinstance(scale, int) or not 20 <= scale < bits[0]:
            raise ConfigError(f"he scale_bits must be an integer in [20, {bits[0]}), got {scale!r}")

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2


def new_site_context(params: CkksParams | None = None) -> Any:
    """A fresh TenSEAL CKKS context with its secret key (symmetric encryption)."""
    ts = tenseal()
    p = params or CkksParams()
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        p.poly_modulus_degree,
        coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    ctx.global_scale = float(2**p.scale_bits)
    return ctx


def site_bytes(ctx: Any) -> bytes:
    """A site context's file contents: parameters and secret key (no relinearization or Galois keys: unused)."""
    return bytes(ctx.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=False))


def broker_bytes(ctx: Any) -> bytes:
    """The broker's part of a context: its parameters and scale, no key of any kind."""
    return bytes(
        ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    )


def from_bytes(data: bytes, where: str) -> Any:
    """A context from its serialization; ConfigError naming ``where`` when it is none."""
    ts = tenseal()
    try:
        return ts.context_from(data)
    except Exception as exc:  # TenSEAL raises ValueError or RuntimeError from its C++ parser
        raise ConfigError(f"{where}: not a TenSEAL context: {exc}") from None


def slots(ctx: Any) -> int:
    """Values one ciphertext of ``ctx`` holds."""
    return int(ctx.seal_context().data.key_context_data().parms().poly_modulus_degree()) // 2


def load_site_context(path: str | os.PathLike[str]) -> Any:
    """A site's context: a private file (mode 0600) holding the secret key; ConfigError naming the file."""
    data = _read(path, private=True)
    ctx = from_bytes(data, str(path))
    if not ctx.has_secret_key():
        raise ConfigError(f"{path}: holds no secret key (is it the broker's {BROKER_FILE}?)")
    return ctx


def load_broker_context(path: str | os.PathLike[str]) -> Any:
    """The broker's context, refused when it, or a file beside it, holds a secret key: the broker must be unable
    to decrypt what it folds."""
    folder = Path(path).resolve().parent
    beside = sorted(p.name for p in folder.glob(f"*{Path(SITE_FILE).suffix}") if p.name.startswith("he_context"))
    if beside:
        raise ConfigError(f"{path}: the broker's folder holds a secret HE context ({', '.join(beside)}): remove it")
    ctx = from_bytes(_read(path, private=False), str(path))
    if ctx.has_secret_key():
        raise ConfigError(f"{path}: holds the secret key; the broker may hold only {BROKER_FILE} (fedbus provision)")
    return ctx


def _read(path: str | os.PathLike[str], *, private: bool) -> bytes:
    try:
        st = os.stat(path)
        if private and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{path}: a secret HE context must be private to its owner (chmod 600 {path})")
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the HE context: {exc.strerror or exc}") from None


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600 from the start), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
