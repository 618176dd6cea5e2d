"""Small builders shared by the strategy tests: models, updates, action filters, a simulated driver."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import TypeVar

import torch

from fedbus.strategy import Action, Cancel, Dispatch, Publish, Strategy, Update

A = TypeVar("A")


def make_model(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny 'network': two float tensors and an integer counter like BatchNorm's."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 2, generator=g),
        "b": torch.randn(2, generator=g),
        "num_batches_tracked": torch.tensor(5, dtype=torch.int64),
    }


def like(model: Mapping[str, torch.Tensor], value: float, counter: int = 0) -> dict[str, torch.Tensor]:
    """Params shaped like ``model`` with every float entry ``value`` and the counter ``counter``."""
    return {
        k: torch.full_like(t, value) if t.is_floating_point() else torch.full_like(t, counter) for k, t in model.items()
    }


def clone(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t.clone() for k, t in params.items()}


def same(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Bit-for-bit equality of two state dicts (names, dtypes and values)."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def of(actions: Iterable[Action], cls: type[A]) -> list[A]:
    return [a for a in actions if isinstance(a, cls)]


def answer(
    d: Dispatch,
    params: Mapping[str, torch.Tensor] | None,
    params_type: str = "FULL",
    weight: float = 1.0,
    metrics: Mapping[str, float] | None = None,
) -> Update:
    """The Update a well-behaved site sends for dispatch ``d``."""
    return Update(d.site, d.task_id, d.version, params, params_type, weight, metrics or {})  # type: ignore[arg-type]


def simulate(
    strategy: Strategy,
    model: Mapping[str, torch.Tensor],
    sites: list[str],
    seed: int,
    max_events: int = 5000,
    trace: list[tuple[Update, list[Action]]] | None = None,
) -> tuple[list[Publish], list[Action]]:
    """Run ``strategy`` to the end against fake sites whose completion order and deltas come from ``seed``.

    Each event picks one outstanding task at random; training tasks answer with a seeded random DIFF.
    Returns the Publish actions and the whole action log; ``trace`` collects (update sent, reply).
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    outstanding: dict[str, Dispatch] = {}
    published: list[Publish] = []
    log: list[Action] = []
    now = 0.0
    acts = strategy.start(model, sites, now)
    for _ in range(max_events):
        log += acts
        for a in acts:
            if isinstance(a, Dispatch):
                outstanding[a.task_id] = a
            elif isinstance(a, Cancel):
                outstanding.pop(a.task_id, None)
            elif isinstance(a, Publish):
                published.append(a)
        if strategy.done or not outstanding:
            break
        d = outstanding.pop(rng.choice(sorted(outstanding)))
        now += rng.random()
        delta = {
            k: torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.1
            for k, t in model.items()
            if t.is_floating_point()
        } | {k: torch.zeros_like(t) for k, t in model.items() if not t.is_floating_point()}
        params = delta if d.kind == "train" else None
        update = answer(d, params, "DIFF", weight=rng.randint(1, 10), metrics={"loss": rng.random()})
        acts = strategy.on_update(update, now)
        if trace is not None:
            trace.append((update, acts))
    return published, log
