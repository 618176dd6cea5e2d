"""The HE keys of one SimEnv or PocEnv execution, made when its job asks for homomorphic encryption.

``fedbus provision`` gives a project one CKKS context: the sites' copy with the secret key, the broker's without
any key. An environment that starts its own broker and sites does the same for its execution, so an encrypted
job (``[extra.privacy] he = true``) runs there as it would on provisioned daemons, with the same checks: the
sites' file private to its owner, the broker's in a folder of its own (a broker refuses one that holds a secret
context beside its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedbus.he.context import BROKER_FILE, SITE_FILE, broker_bytes, new_site_context, site_bytes, write_private
from fedbus.he.options import he_options

if TYPE_CHECKING:
    from fedbus.recipes.recipe import Recipe


@dataclass(frozen=True)
class HEKeys:
    """Where an execution's contexts are: ``site`` (secret, 0600) for every site, ``broker`` (keyless)."""

    site: Path
    broker: Path


def wants_he(recipe: Recipe) -> bool:
    """Whether the recipe's job asks for homomorphic encryption (its ``[extra.privacy]``, checked as a job's)."""
    return he_options(recipe.extra, f"recipe {recipe.name}") is not None


def execution_keys(recipe: Recipe, workspace: Path) -> HEKeys | None:
    """A fresh CKKS context under ``workspace/he-keys`` when ``recipe`` asks for encryption; None otherwise."""
    if not wants_he(recipe):
        return None
    ctx = new_site_context()
    sites, broker = workspace / "he-keys" / "sites", workspace / "he-keys" / "broker"
    for folder in (sites, broker):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = HEKeys(site=sites / SITE_FILE, broker=broker / BROKER_FILE)
    write_private(keys.site, site_bytes(ctx))
    keys.broker.write_bytes(broker_bytes(ctx))
    return keys
