"""The federation's data: scikit-learn's bundled 8x8 digits (no download), split non-IID over the sites.

A fixed, stratified 20% of the 1,797 digits is held out; it lives only at the driver, which scores every
global model version on it. The other 80% is dealt out over the sites with the usual Dirichlet(alpha)
label skew (Hsu et al., 2019): for each class, the class's samples are split among the sites by proportions
drawn from Dirichlet(alpha, ..., alpha). Small alpha gives each site a few dominant classes; large alpha
approaches an IID split. Every function is a pure function of its arguments, so each site recomputes the
same partition and keeps only its own part.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HELDOUT_FRACTION = 0.2
HELDOUT_SEED = 1234  # fixed on purpose: every experiment seed is scored on the same held-out digits
MIN_SAMPLES = 8  # each site gets at least this many training samples (at least one mini-batch)


@cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """All digits as float32 features in [0, 1] (pixels / 16) and int64 labels; loaded once per process."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training pool and of the held-out set (disjoint, stratified by label, fixed)."""
    _, y = _digits()
    train_idx, heldout_idx = train_test_split(
        np.arange(len(y)), test_size=HELDOUT_FRACTION, random_state=HELDOUT_SEED, stratify=y
    )
    return np.sort(train_idx), np.sort(heldout_idx)


def dirichlet_partition(
    labels: np.ndarray, num_sites: int, alpha: float, seed: int, min_samples: int = MIN_SAMPLES
) -> list[np.ndarray]:
    """Positions into ``labels`` for each site: disjoint, together all of them, label-skewed by ``alpha``.

    Per class, the class's (shuffled) positions are cut at the cumulative Dirichlet(alpha) proportions.
    A site left with fewer than ``min_samples`` then takes random samples from the largest site, one at a
    time, so a tiny alpha still leaves no site without a mini-batch (and the result stays deterministic).
    """
    labels = np.asarray(labels)
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if num_sites * min_samples > len(labels):
        raise ValueError(f"{len(labels)} samples cannot give {num_sites} sites {min_samples} each")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_sites)]
    for cls in np.unique(labels):
        pos = rng.permutation(np.flatnonzero(labels == cls))
        share = rng.dirichlet(np.full(num_sites, alpha))
        cuts = (np.cumsum(share)[:-1] * len(pos)).round().astype(int)
        for site, chunk in enumerate(np.split(pos, cuts)):
            parts[site].extend(chunk.tolist())
    sizes = np.array([len(p) for p in parts])
    while sizes.min() < min_samples:
        needy, donor = int(sizes.argmin()), int(sizes.argmax())
        moved = parts[donor].pop(int(rng.integers(len(parts[donor]))))
        parts[needy].append(moved)
        sizes[needy] += 1
        sizes[donor] -= 1
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def heldout() -> tuple[np.ndarray, np.ndarray]:
    """The held-out (x, y): never seen by any site; the driver scores global models on it."""
    x, y = _digits()
    _, idx = split_indices()
    return x[idx], y[idx]


def partition(num_sites: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Each site's indices into the full digits array (all inside the training pool)."""
    _, y = _digits()
    pool, _ = split_indices()
    return [pool[p] for p in dirichlet_partition(y[pool], num_sites, alpha, seed)]


def site_data(site_index: int, num_sites: int, alpha: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """This site's training (x, y): part ``site_index`` of the Dirichlet partition of the training pool."""
    if not 0 <= site_index < num_sites:
        raise ValueError(f"site_index must be in [0, {num_sites}), got {site_index}")
    x, y = _digits()
    idx = partition(num_sites, alpha, seed)[site_index]
    return x[idx], y[idx]
