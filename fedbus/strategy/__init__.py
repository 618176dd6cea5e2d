"""Aggregation strategies: pure, IO-free state machines over plain tensors.

A controller drives a :class:`Strategy` with events (``start``, ``site_joined``, ``site_left``,
``on_update``, ``task_failed``, ``tick``) and executes the actions it returns (:class:`Dispatch`,
:class:`Publish`, :class:`Accepted`, :class:`Rejected`, :class:`Evaluated`, :class:`Cancel`,
:class:`Finished`, :class:`Failed`). Configs name a strategy; :func:`make_strategy` resolves the name
through :data:`STRATEGIES` and checks the arguments before anything runs.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from fedbus.errors import ConfigError
from fedbus.strategy.aggregate import (
    STALENESS_FUNCTIONS,
    MetricMean,
    constant,
    finalize_mean,
    hinge,
    make_staleness_fn,
    polynomial,
    weighted_sum_into,
)
from fedbus.strategy.base import (
    Accepted,
    Action,
    Cancel,
    Dispatch,
    Evaluated,
    Failed,
    Finished,
    Publish,
    Rejected,
    Strategy,
    Update,
    validate_update,
)
from fedbus.strategy.cross_site import CrossSiteEval, StandaloneCrossSiteEval
from fedbus.strategy.fedavg import FedAvg
from fedbus.strategy.fedbuff import FedBuff
from fedbus.strategy.server_opt import ServerAdam, ServerOptimizer, ServerSGD

__all__ = [
    "STALENESS_FUNCTIONS",
    "STRATEGIES",
    "Accepted",
    "Action",
    "Cancel",
    "CrossSiteEval",
    "Dispatch",
    "Evaluated",
    "Failed",
    "FedAvg",
    "FedBuff",
    "Finished",
    "MetricMean",
    "Publish",
    "Rejected",
    "ServerAdam",
    "ServerOptimizer",
    "ServerSGD",
    "Strategy",
    "Update",
    "constant",
    "finalize_mean",
    "hinge",
    "make_staleness_fn",
    "make_strategy",
    "polynomial",
    "validate_update",
    "weighted_sum_into",
]

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedbuff": FedBuff,
    "cross_site_eval": StandaloneCrossSiteEval,
}


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def make_strategy(name: str, **kwargs: Any) -> Strategy:
    """Build the strategy registered as ``name`` (case-insensitive) from plain config values.

    Raises ConfigError for an unknown name, an unknown or missing argument (listing what the strategy
    accepts, with a did-you-mean), or a bad value (the constructor names the argument).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    cls = STRATEGIES.get(key)  # type: ignore[arg-type]
    if cls is None:
        known = sorted(STRATEGIES)
        raise ConfigError(f"unknown strategy {name!r}{_suggest(str(key), known)}; known: {', '.join(known)}")
    params = inspect.signature(cls).parameters
    accepted = list(params)
    for arg in kwargs:
        if arg not in params:
            raise ConfigError(
                f"strategy {key!r} has no argument {arg!r}{_suggest(arg, accepted)}; it accepts: {', '.join(accepted)}"
            )
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        raise ConfigError(f"strategy {key!r} needs argument(s): {', '.join(missing)}")
    return cls(**kwargs)
