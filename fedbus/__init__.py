"""fedbus: federated learning on a ZeroMQ message bus.

The ways in live in their own packages, imported on purpose so that a training script that does
``import fedbus.client as flare`` loads no broker or strategy code:

* ``fedbus.client``   the training-script API (FLARE-style ``init / is_running / receive / send``)
* ``fedbus.recipes``  FedAvgRecipe, FedBuffRecipe and the SimEnv / PocEnv / ProdEnv environments
* ``fedbus.broker``, ``fedbus.site``  the daemons behind ``fedbus broker`` and ``fedbus site``

This module only carries the version and the exception tree.
"""

from fedbus.errors import (
    ConfigError,
    FedbusError,
    HeaderError,
    JobError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StrategyError,
    TransportError,
    UpdateRejected,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FedbusError",
    "HeaderError",
    "JobError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "StrategyError",
    "TransportError",
    "UpdateRejected",
    "__version__",
]
