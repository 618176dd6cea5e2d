"""What a task asks of the script's client API (``Task.options``), read into one typed value.

The broker fills ``Task.options`` from the strategy's ``client_options()`` merged with the job's ``[client]`` table;
the site relays it untouched. The keys the client API understands:

* ``exchange``: ``"pytorch"`` (default) or ``"numpy"``: the form of ``params`` the script receives and sends.
* ``transfer_type``: ``"FULL"`` (default) or ``"DIFF"``: DIFF turns a FULL result into ``local - received``.
* ``memory_gc_rounds``: every that many training results, release what the session holds and ``gc.collect()``.
* ``fedprox_mu``: FedProx's proximal weight (0: off).
* ``scaffold``: SCAFFOLD's control variates travel with the model.
* ``submit_model``: the task asks for the site's local model (cross-site evaluation).

Unknown keys are ignored (a newer broker may ask for more than this client knows); a known key with a value of the
wrong kind is an error that names the key, since it would otherwise change training silently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedbus.client.constants import ExchangeFormat, TransferType
from fedbus.errors import ConfigError


@dataclass(frozen=True)
class TaskOptions:
    """``Task.options`` checked and typed; the defaults are what a task without options means."""

    exchange: ExchangeFormat = ExchangeFormat.PYTORCH
    transfer_type: TransferType = TransferType.FULL
    memory_gc_rounds: int = 0
    fedprox_mu: float = 0.0
    scaffold: bool = False
    submit_model: bool = False

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> TaskOptions:
        """The options of a task; raises ConfigError naming the key whose value cannot be used."""
        if not options:
            return cls()
        if not isinstance(options, Mapping):
            raise ConfigError(f"task options must be a mapping, got {type(options).__name__}")
        exchange = options.get("exchange", ExchangeFormat.PYTORCH)
        if exchange not in (ExchangeFormat.PYTORCH, ExchangeFormat.NUMPY):
            raise ConfigError(f"task option 'exchange' must be 'pytorch' or 'numpy', got {exchange!r}")
        transfer = options.get("transfer_type", TransferType.FULL)
        if transfer not in (TransferType.FULL, TransferType.DIFF):
            raise ConfigError(f"task option 'transfer_type' must be 'FULL' or 'DIFF', got {transfer!r}")
        gc_rounds = options.get("memory_gc_rounds", 0)
        if isinstance(gc_rounds, bool) or not isinstance(gc_rounds, int) or gc_rounds < 0:
            raise ConfigError(f"task option 'memory_gc_rounds' must be an integer >= 0, got {gc_rounds!r}")
        mu = options.get("fedprox_mu", 0.0)
        if isinstance(mu, bool) or not isinstance(mu, int | float) or not math.isfinite(mu) or mu < 0:
            raise ConfigError(f"task option 'fedprox_mu' must be a finite number >= 0, got {mu!r}")
        return cls(
            exchange=ExchangeFormat(exchange),
            transfer_type=TransferType(transfer),
            memory_gc_rounds=gc_rounds,
            fedprox_mu=float(mu),
            scaffold=_flag(options, "scaffold"),
            submit_model=_flag(options, "submit_model"),
        )


def _flag(options: Mapping[str, Any], key: str) -> bool:
    value = options.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"task option {key!r} must be true or false, got {value!r}")
    return value
