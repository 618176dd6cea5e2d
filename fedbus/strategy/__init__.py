"""Aggregation strategies: pure, IO-free state machines over plain tensors.

A controller drives a :class:`Strategy` with events (``start``, ``site_joined``, ``site_left``,
``on_update``, ``task_failed``, ``tick``) and executes the actions it returns (:class:`Dispatch`,
:class:`Publish`, :class:`Accepted`, :class:`Rejected`, :class:`Evaluated`, :class:`Cancel`,
:class:`Finished`, :class:`Failed`). Configs name a strategy; :func:`make_strategy` resolves the name
through :data:`STRATEGIES` and checks the arguments before anything runs. A name of the form
``"package.module:ClassName"`` is a user's own strategy (the aggregator extension point; see
``fedbus.strategy.fedavg_lr`` for a worked example): it is imported and must subclass :class:`Strategy`.
"""

from __future__ import annotations

import difflib
import importlib
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
from fedbus.strategy.cyclic import Cyclic
from fedbus.strategy.fedavg import FedAvg
from fedbus.strategy.fedavg_lr import FedAvgLr
from fedbus.strategy.fedbuff import FedBuff
from fedbus.strategy.fedeval import FedEval
from fedbus.strategy.fedopt import FedOpt
from fedbus.strategy.fedprox import FedProx
from fedbus.strategy.scaffold import SCAFFOLD_PREFIX, Scaffold
from fedbus.strategy.server_opt import ServerAdagrad, ServerAdam, ServerOptimizer, ServerSGD, ServerYogi

__all__ = [
    "SCAFFOLD_PREFIX",
    "STALENESS_FUNCTIONS",
    "STRATEGIES",
    "Accepted",
    "Action",
    "Cancel",
    "CrossSiteEval",
    "Cyclic",
    "Dispatch",
    "Evaluated",
    "Failed",
    "FedAvg",
    "FedAvgLr",
    "FedBuff",
    "FedEval",
    "FedOpt",
    "FedProx",
    "Finished",
    "MetricMean",
    "Publish",
    "Rejected",
    "Scaffold",
    "ServerAdagrad",
    "ServerAdam",
    "ServerOptimizer",
    "ServerSGD",
    "ServerYogi",
    "Strategy",
    "Update",
    "constant",
    "finalize_mean",
    "hinge",
    "make_staleness_fn",
    "make_strategy",
    "polynomial",
    "resolve_strategy_class",
    "validate_update",
    "weighted_sum_into",
]

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedbuff": FedBuff,
    "fedprox": FedProx,
    "scaffold": Scaffold,
    "fedopt": FedOpt,
    "cyclic": Cyclic,
    "fedeval": FedEval,
    "fedavg_lr": FedAvgLr,
    "cross_site_eval": StandaloneCrossSiteEval,
}


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve_strategy_class(path: str) -> type[Strategy]:
    """The Strategy subclass at ``"package.module:ClassName"`` (the class name may be dotted, for a nested class).

    Only the import and the checks happen here: whoever runs the strategy puts the job folder on ``sys.path``
    first. Raises ConfigError naming ``path`` when the module cannot be imported (any error while importing it),
    the name is missing, or it is not a concrete subclass of :class:`Strategy`.
    """
    module_name, _, attr = path.strip().partition(":")
    if not module_name or not attr:
        raise ConfigError(f"strategy {path!r}: a user strategy is named 'package.module:ClassName'")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:  # a broken user module fails in any way; say which path and why
        raise ConfigError(f"strategy {path!r}: cannot import module {module_name!r}: {exc!r}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"strategy {path!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Strategy)):
        raise ConfigError(f"strategy {path!r}: {attr!r} is not a subclass of fedbus.strategy.Strategy")
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
        raise ConfigError(f"strategy {path!r}: {attr!r} does not implement {missing}")
    return obj


def make_strategy(name: str, **kwargs: Any) -> Strategy:
    """Build the strategy registered as ``name`` (case-insensitive) from plain config values.

    A name with a colon, ``"package.module:ClassName"``, is a user's Strategy subclass, imported by
    :func:`resolve_strategy_class`. Raises ConfigError for an unknown name, an unknown or missing argument
    (listing what the strategy accepts, with a did-you-mean), or a bad value (the constructor names the argument).
    """
    if isinstance(name, str) and ":" in name:
        cls = resolve_strategy_class(name)
        key = name.strip()
    else:
        key = name.strip().lower() if isinstance(name, str) else name
        found = STRATEGIES.get(key)
        if found is None:
            known = sorted(STRATEGIES)
            raise ConfigError(f"unknown strategy {name!r}{_suggest(str(key), known)}; known: {', '.join(known)}")
        cls = found
    if "secure_aggregation" in kwargs:  # FedAvg with secure aggregation (imported here: it needs cryptography)
        from fedbus.strategy.secure_fedavg import secure

        cls, kwargs = secure(cls, kwargs)
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
