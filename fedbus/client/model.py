"""FLModel: what a training script receives and sends, in NVIDIA FLARE's shape.

A FLARE script builds ``FLModel(params=model.state_dict(), meta={"NUM_STEPS_CURRENT_ROUND": n})`` and
reads ``input_model.params``; fedbus keeps those names and defaults so the script runs unchanged. The
helpers here turn whatever the script hands over (torch tensors on any device, numpy arrays, numpy or
torch scalars in metrics) into what travels: CPU tensors and plain msgpack values, and they refuse
anything else with an error that names the offending key, because "cannot serialize object" three
layers down is useless to someone debugging a training loop.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedbus.client.constants import FLMetaKey
from fedbus.errors import ConfigError

NUM_STEPS_CURRENT_ROUND = FLMetaKey.NUM_STEPS_CURRENT_ROUND
"""Meta key: how many optimizer steps the script ran this round; it becomes the update's weight."""


class ParamsType(enum.StrEnum):
    """Whether ``params`` are whole weights (FULL) or ``local - global`` deltas (DIFF)."""

    FULL = "FULL"
    DIFF = "DIFF"


@dataclass(repr=False)
class FLModel:
    """A model (or a delta, or only metrics) travelling between the federation and a training script.

    ``current_round`` counts from 0 (the first round trains from the start model, version 0), ``total_rounds`` is
    the job's number of rounds, and ``meta`` carries FLARE's keys (``FLMetaKey``: ``current_round``,
    ``total_rounds``, ``job_id``, ``site_name``) besides fedbus's own. ``optimizer_params`` and ``start_round``
    exist only so FLARE scripts that set them still run; fedbus does not transmit them. ``repr()`` is a summary
    (what each field holds, never the tensors), as FLARE's.
    """

    params: Mapping[str, Any] | None = None
    params_type: ParamsType | str | None = ParamsType.FULL
    metrics: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # None is accepted too (FLARE scripts pass it)
    current_round: int | None = None
    total_rounds: int | None = None
    optimizer_params: Any = None
    start_round: int = 0

    def __post_init__(self) -> None:
        if self.params_type is None:
            self.params_type = ParamsType.FULL
        try:
            self.params_type = ParamsType(self.params_type)
        except ValueError:
            raise ConfigError(f"FLModel.params_type must be 'FULL' or 'DIFF', got {self.params_type!r}") from None
        if self.meta is None:
            self.meta = {}

    def summary(self) -> dict[str, Any]:
        """What the model holds, in a few words: counts for mappings, the rounds, the params type."""
        out: dict[str, Any] = {}
        if self.params is not None:
            out["params"] = f"{len(self.params)} arrays" if isinstance(self.params, Mapping) else type(self.params)
            out["params_type"] = str(self.params_type)
        for name in ("metrics", "meta"):
            value = getattr(self, name)
            if value:
                out[name] = sorted(value) if isinstance(value, Mapping) else type(value)
        for name in ("current_round", "total_rounds"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def __repr__(self) -> str:
        return f"FLModel({', '.join(f'{k}={v}' for k, v in self.summary().items())})"


def to_cpu_params(params: Any) -> dict[str, torch.Tensor]:
    """Validate ``params`` (str -> tensor or ndarray) and return detached, contiguous CPU tensors.

    Tensors already on the CPU and contiguous are passed by reference, not copied.
    """
    if not isinstance(params, Mapping):
        raise ConfigError(f"FLModel.params must be a mapping of name -> tensor, got {type(params).__name__}")
    out: dict[str, torch.Tensor] = {}
    for key, value in params.items():
        if not isinstance(key, str):
            raise ConfigError(f"FLModel.params keys must be str, got {type(key).__name__} ({key!r})")
        out[key] = _to_cpu_tensor(key, value)
    return out


def _to_cpu_tensor(key: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu").contiguous()
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        if not arr.flags.writeable:  # torch.from_numpy warns about read-only arrays; a copy is honest
            arr = arr.copy()
        try:
            return torch.from_numpy(arr)
        except TypeError as exc:
            raise ConfigError(f"FLModel.params[{key!r}]: numpy dtype {arr.dtype} has no torch equivalent") from exc
    raise ConfigError(f"FLModel.params[{key!r}] must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def to_numpy_params(params: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """CPU tensors as numpy arrays sharing their memory (what a numpy job's script receives), dtype kept."""
    out: dict[str, np.ndarray] = {}
    for key, value in params.items():
        try:
            out[key] = value.detach().numpy()
        except TypeError as exc:  # bfloat16 and other types numpy lacks
            raise ConfigError(f"params[{key!r}]: torch dtype {value.dtype} has no numpy equivalent") from exc
    return out


def keep_received_dtypes(params: Mapping[str, Any], received: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``params`` with each numpy array cast back to the dtype its received tensor had, where numpy arithmetic
    widened it within the same kind (float32 to float64): the global model's dtypes are what the server takes.
    An array whose kind changed (an integer model made float) is left as it is, for the server to judge."""
    out = dict(params)
    for key, value in params.items():
        base = received.get(key)
        if not isinstance(value, np.ndarray) or base is None:
            continue
        try:
            want = torch.empty(0, dtype=base.dtype).numpy().dtype
        except TypeError:
            continue
        if value.dtype != want and np.can_cast(value.dtype, want, casting="same_kind"):
            out[key] = value.astype(want)
    return out


def diff_params(local: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``local - received`` per tensor: what a DIFF strategy expects when the script sent FULL weights."""
    out: dict[str, torch.Tensor] = {}
    for key, value in local.items():
        base = received.get(key)
        if base is None:
            raise ConfigError(f"cannot send DIFF: params[{key!r}] was not in the received model")
        if base.shape != value.shape:
            raise ConfigError(
                f"cannot send DIFF: params[{key!r}] has shape {tuple(value.shape)}, "
                f"the received model {tuple(base.shape)}"
            )
        if value.dtype == torch.bool:
            raise ConfigError(f"cannot send DIFF: params[{key!r}] is a bool tensor (no difference defined)")
        out[key] = torch.sub(value, base.to(value.dtype))
    return out


def plain_values(value: Any, where: str) -> Any:
    """``value`` as plain msgpack data (numbers, str, bool, None, lists, str-keyed dicts).

    Scalars from torch and numpy become Python numbers and small arrays lists, so ``metrics={"acc": acc}``
    works whatever ``acc`` is. Non-finite floats are refused: they would poison an average at the broker.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{where} is {value} (not finite)")
        return value
    if isinstance(value, torch.Tensor | np.ndarray | np.generic):
        item = value.detach().cpu() if isinstance(value, torch.Tensor) else value
        return plain_values(item.tolist(), where)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where} has a non-str key {k!r}")
            out[k] = plain_values(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, list | tuple):
        return [plain_values(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"{where} must be a number, str, bool, list or dict, got {type(value).__name__}")
