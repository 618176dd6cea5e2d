"""Synthetic(alpha, beta), the federated benchmark of the FedProx paper (Li et al., 2020), generated locally.

Each device k has its own softmax-regression model and its own feature distribution:
``u_k ~ N(0, alpha)``, ``W_k, b_k ~ N(u_k, 1)`` (10 x 60 and 10), ``B_k ~ N(0, beta)``, ``v_k ~ N(B_k, 1)`` (60),
``x ~ N(v_k, Sigma)`` with ``Sigma = diag(j^-1.2)``, ``y = argmax(W_k x + b_k)``. ``alpha`` controls how much
the devices' models differ, ``beta`` how much their data differ. Sample counts follow a power law
(lognormal, at least ``MIN_SAMPLES``). Every function is a pure function of (seed, device), so a device's data
is generated where it trains, and the driver regenerates the held-out part of any device without the others.
Each device keeps 80% of its samples for training; the other 20% of every device is the held-out test set.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

DIM, CLASSES = 60, 10
MIN_SAMPLES = 10
TRAIN_FRACTION = 0.8


@lru_cache(maxsize=4096)
def device(k: int, alpha: float, beta: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Device ``k``'s (x_train, y_train, x_test, y_test), float32 features and int64 labels."""
    rng = np.random.default_rng([seed, k])
    n = max(MIN_SAMPLES, int(rng.lognormal(4.0, 1.0)))
    u = rng.normal(0.0, np.sqrt(alpha))
    w = rng.normal(u, 1.0, (CLASSES, DIM))
    b = rng.normal(u, 1.0, CLASSES)
    v = rng.normal(rng.normal(0.0, np.sqrt(beta)), 1.0, DIM)
    sigma = np.arange(1, DIM + 1, dtype=np.float64) ** -1.2
    x = rng.normal(v, np.sqrt(sigma), (n, DIM))
    y = np.argmax(x @ w.T + b, axis=1)
    cut = max(1, int(TRAIN_FRACTION * n))
    x, y = x.astype(np.float32), y.astype(np.int64)
    return x[:cut], y[:cut], x[cut:], y[cut:]


def heldout(devices: int, alpha: float, beta: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The held-out 20% of every device, together."""
    parts = [device(k, alpha, beta, seed) for k in range(devices)]
    return np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])
