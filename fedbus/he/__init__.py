"""Homomorphic encryption of model updates (CKKS, through TenSEAL): the broker sums what it cannot read.

A job asks for it in ``job.toml`` (``[extra.privacy] he = true``; :mod:`fedbus.he.options`). Every site of
the project holds one CKKS context with its secret key (``fedbus provision`` writes it: :mod:`fedbus.he.keys`);
the broker holds the same parameters without any key. A site encrypts each floating tensor of its update
(:mod:`fedbus.he.codec`) into a *blob*, a uint8 tensor of the same name in the safetensors layout
(:mod:`fedbus.he.blob`), so ciphertexts take the ordinary chunked, resumable model streams. The broker folds
blobs with public weights (:mod:`fedbus.he.fold`; FedAvg's sample counts, FedBuff's staleness weights and
server learning rate) into a global model that stays encrypted, and streams it back; the site decrypts it
before its training script sees it. Tensors the job names in ``he_plaintext`` (and every integer tensor: CKKS
is approximate) travel and fold in plaintext.

TenSEAL is an optional dependency (``pip install 'fedbus[he]'``): everything here that needs it imports it
through :func:`fedbus.he.context.tenseal`, which raises a ConfigError saying how to install it.
"""

from __future__ import annotations

from fedbus.he.options import HEOptions, he_options

__all__ = ["HEOptions", "he_options"]
