"""The training-script API: ``import fedbus.client as flare`` in place of NVIDIA FLARE's client API.

```python
import fedbus.client as flare
flare.init()
while flare.is_running():
    input_model = flare.receive()
    model.load_state_dict(input_model.params)
    ...  # train
    flare.send(flare.FLModel(params=model.cpu().state_dict(), meta={"NUM_STEPS_CURRENT_ROUND": n}))
```

Besides the functions, the names a FLARE script imports from elsewhere in ``nvflare`` live here too: ``FLModel``
and ``ParamsType`` (FLARE's ``app_common.abstract.fl_model``), ``FLMetaKey`` (``apis.fl_constant``), ``DataKind``
(``apis.dxo``), ``NPConstants`` (``app_common.np.constants``), ``TransferType`` and ``ExchangeFormat``
(``client.config``, also as ``fedbus.client.config``). Submodules: ``fedbus.client.tracking`` (SummaryWriter,
MLflowWriter, WandBWriter), ``fedbus.client.lightning`` (``patch(trainer)``), ``fedbus.client.fedprox``
(FedProxLoss) and ``fedbus.client.scaffold`` (ScaffoldHelper).

This package imports no broker, strategy or transport code: a training script pays only for the link.
"""

from fedbus.client.api import (
    get_config,
    get_job_id,
    get_site_name,
    get_task_name,
    init,
    is_evaluate,
    is_running,
    is_submit_model,
    is_train,
    log,
    receive,
    send,
    shutdown,
    system_info,
)
from fedbus.client.constants import DataKind, ExchangeFormat, FLMetaKey, NPConstants, TransferType
from fedbus.client.model import NUM_STEPS_CURRENT_ROUND, FLModel, ParamsType
from fedbus.client.session import ClientSession

__all__ = [
    "NUM_STEPS_CURRENT_ROUND",
    "ClientSession",
    "DataKind",
    "ExchangeFormat",
    "FLMetaKey",
    "FLModel",
    "NPConstants",
    "ParamsType",
    "TransferType",
    "get_config",
    "get_job_id",
    "get_site_name",
    "get_task_name",
    "init",
    "is_evaluate",
    "is_running",
    "is_submit_model",
    "is_train",
    "log",
    "receive",
    "send",
    "shutdown",
    "system_info",
]
