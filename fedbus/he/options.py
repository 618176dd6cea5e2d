"""A job's request for homomorphic encryption, from ``job.toml``::

    [extra.privacy]
    he = true                       # encrypt every floating tensor of every update (CKKS)
    he_plaintext = ["bn.*"]         # optional: these travel and fold in plaintext (names or fnmatch patterns)

It lives in ``[extra.privacy]`` beside the job's DP request because both are read by the broker and the sites
alike. Checked here, without TenSEAL, so ``fedbus submit`` refuses a malformed request on any machine.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedbus.errors import ConfigError

KEYS = ("he", "he_plaintext")
"""The keys of ``[extra.privacy]`` this module reads."""

STRATEGIES = ("fedavg", "fedbuff")
"""Strategies whose fold is linear in the updates with public weights: the ones an encrypted job can use."""


@dataclass(frozen=True)
class HEOptions:
    """What a job asked for: ``plaintext`` are the tensor names (or fnmatch patterns) left unencrypted."""

    plaintext: tuple[str, ...] = ()

    def encrypts(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` (named ``name``) travels encrypted: floating, not empty, not named in ``he_plaintext``."""
        if not tensor.is_floating_point() or tensor.numel() == 0:
            return False
        return not any(name == p or fnmatch.fnmatchcase(name, p) for p in self.plaintext)


def he_options(extra: Mapping[str, Any], where: str = "job.toml") -> HEOptions | None:
    """The job's HE request from its ``[extra]`` table, or None when it asks for none; ConfigError naming the key."""
    privacy = extra.get("privacy", {}) if isinstance(extra, Mapping) else {}
    if not isinstance(privacy, Mapping):
        raise ConfigError(f"{where}: [extra.privacy] must be a table")
    on = privacy.get("he", False)
    if not isinstance(on, bool):
        raise ConfigError(f"{where}: [extra.privacy] he must be true or false, got {on!r}")
    plaintext = privacy.get("he_plaintext", [])
    if isinstance(plaintext, str) or not isinstance(plaintext, Sequence):
        raise ConfigError(f"{where}: [extra.privacy] he_plaintext must be a list of tensor names, got {plaintext!r}")
    if not all(isinstance(p, str) and p for p in plaintext):
        raise ConfigError(f"{where}: [extra.privacy] he_plaintext entries must be non-empty strings, got {plaintext!r}")
    if not on:
        if plaintext:
            raise ConfigError(f"{where}: [extra.privacy] he_plaintext needs he = true")
        return None
    return HEOptions(tuple(plaintext))
