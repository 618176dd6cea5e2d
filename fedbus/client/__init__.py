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

This package imports no broker, strategy or transport code: a training script pays only for the link.
"""

from fedbus.client.api import (
    ClientSession,
    get_job_id,
    get_site_name,
    get_task_name,
    init,
    is_evaluate,
    is_running,
    is_train,
    log,
    receive,
    send,
    shutdown,
    system_info,
)
from fedbus.client.model import NUM_STEPS_CURRENT_ROUND, FLMetaKey, FLModel, ParamsType

__all__ = [
    "NUM_STEPS_CURRENT_ROUND",
    "ClientSession",
    "FLMetaKey",
    "FLModel",
    "ParamsType",
    "get_job_id",
    "get_site_name",
    "get_task_name",
    "init",
    "is_evaluate",
    "is_running",
    "is_train",
    "log",
    "receive",
    "send",
    "shutdown",
    "system_info",
]
