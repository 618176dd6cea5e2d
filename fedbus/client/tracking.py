"""Experiment tracking from a training script: TensorBoard-, MLflow- and W&B-shaped writers (FLARE's
``nvflare.client.tracking``).

Each call becomes one record, ``JobEvent(event="log", data={"key", "value", "step", "kind", "writer"})``, sent over
the script's link like ``flare.log`` (``ClientSession.log``); the site relays it and the broker's tracking sink
writes it into the job's TensorBoard event files, MLflow store or W&B offline runs, per the job's ``[tracking]``
table (any writer's records go to every configured type). Nothing here imports tensorboard, mlflow or wandb.

Values are checked here, where the script can still be fixed: metrics and scalars must be finite numbers (torch and
numpy scalars are taken), steps integers >= 0; the error names the offending key.

| writer          | call                                                 | kind      | key           |
|-----------------|------------------------------------------------------|-----------|---------------|
| SummaryWriter   | ``add_scalar(tag, scalar, global_step)``             | scalar    | tag           |
| SummaryWriter   | ``add_scalars(tag, {name: value}, global_step)``     | scalars   | tag           |
| MLflowWriter    | ``log_metric(key, value, step)``                     | metric    | key           |
| MLflowWriter    | ``log_metrics({name: value}, step)``                 | metrics   | ``metrics``   |
| MLflowWriter    | ``log_param(key, value)`` / ``log_params(dict)``     | param(s)  | key/``params``|
| MLflowWriter    | ``set_tag(key, value)`` / ``set_tags(dict)``         | tag(s)    | key/``tags``  |
| MLflowWriter    | ``log_text(text, artifact_file_path)``               | text      | the path      |
| WandBWriter     | ``log({name: value}, step)``                         | metrics   | ``metrics``   |
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedbus.client.model import plain_values
from fedbus.errors import ConfigError

if TYPE_CHECKING:
    from fedbus.client.session import ClientSession

__all__ = ["MLflowWriter", "SummaryWriter", "WandBWriter"]

TENSORBOARD, MLFLOW, WANDB = "tensorboard", "mlflow", "wandb"


def _number(value: Any, where: str) -> float | int:
    """A finite real number (torch and numpy scalars included), or ConfigError naming ``where``."""
    plain = plain_values(value, where) if not isinstance(value, int | float) else value
    if isinstance(plain, bool) or not isinstance(plain, int | float):  # plain_values yields no other reals
        raise ConfigError(f"{where} must be a number, got {type(value).__name__}")
    if not math.isfinite(plain):
        raise ConfigError(f"{where} is {plain} (not finite)")
    return plain


def _numbers(values: Any, where: str) -> dict[str, float | int]:
    if not isinstance(values, Mapping) or not values:
        raise ConfigError(f"{where} must be a non-empty dict of name -> number, got {type(values).__name__}")
    out: dict[str, float | int] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where} has a key that is not a non-empty str: {key!r}")
        out[key] = _number(value, f"{where}[{key!r}]")
    return out


def _step(step: Any, where: str) -> int | None:
    if step is None:
        return None
    plain = plain_values(step, where) if not isinstance(step, int) else step
    if isinstance(plain, float) and plain.is_integer():
        plain = int(plain)
    if isinstance(plain, bool) or not isinstance(plain, int) or plain < 0:
        raise ConfigError(f"{where} must be an integer >= 0, got {step!r}")
    return plain


def _name(key: Any, what: str) -> str:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{what} must be a non-empty str, got {key!r}")
    return key


def _param(value: Any, where: str) -> str | int | float | bool:
    """An MLflow parameter or tag value: str, bool or finite number as given, anything else as its str()."""
    if isinstance(value, str | bool):
        return value
    if isinstance(value, numbers.Real) or hasattr(value, "item"):
        try:
            return _number(value, where)
        except ConfigError:
            pass
    return str(value)


class _Writer:
    """Sends records through a client session: the given one, else the script's current one at each call."""

    writer = ""

    def __init__(self, session: ClientSession | None = None) -> None:
        self._session = session

    def _send(self, key: str, value: Any, step: int | None, kind: str) -> None:
        if self._session is not None:
            session = self._session
        else:
            from fedbus.client.api import current_session  # the package imports this module: resolve it late

            session = current_session()
        session.log(key, value, step, kind=kind, writer=self.writer)


class SummaryWriter(_Writer):
    """TensorBoard's ``SummaryWriter`` calls, recorded in the job's TensorBoard files at the broker."""

    writer = TENSORBOARD

    def add_scalar(self, tag: str, scalar: Any, global_step: int | None = None) -> None:
        """One scalar under ``tag`` at ``global_step``."""
        tag = _name(tag, "add_scalar() tag")
        self._send(tag, _number(scalar, f"scalar {tag!r}"), _step(global_step, f"global_step of {tag!r}"), "scalar")

    def add_scalars(self, tag: str, scalars: Mapping[str, Any], global_step: int | None = None) -> None:
        """Several scalars under the parent ``tag`` at ``global_step``."""
        tag = _name(tag, "add_scalars() tag")
        step = _step(global_step, f"global_step of {tag!r}")
        self._send(tag, _numbers(scalars, f"scalars of {tag!r}"), step, "scalars")

    def flush(self) -> None:
        """Nothing to do: every record was handed to the link when it was added."""

    def close(self) -> None:
        """Nothing to do (see :meth:`flush`); present because TensorBoard scripts call it."""


class MLflowWriter(_Writer):
    """MLflow's logging calls, recorded in the job's MLflow store at the broker."""

    writer = MLFLOW

    def log_metric(self, key: str, value: Any, step: int | None = None) -> None:
        key = _name(key, "log_metric() key")
        self._send(key, _number(value, f"metric {key!r}"), _step(step, f"step of {key!r}"), "metric")

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self._send("metrics", _numbers(metrics, "metrics"), _step(step, "step of metrics"), "metrics")

    def log_param(self, key: str, value: Any) -> None:
        key = _name(key, "log_param() key")
        self._send(key, _param(value, f"param {key!r}"), None, "param")

    def log_params(self, values: Mapping[str, Any]) -> None:
        self._send("params", self._values(values, "params"), None, "params")

    def set_tag(self, key: str, tag: Any) -> None:
        key = _name(key, "set_tag() key")
        self._send(key, _param(tag, f"tag {key!r}"), None, "tag")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._send("tags", self._values(tags, "tags"), None, "tags")

    def log_text(self, text: str, artifact_file_path: str) -> None:
        """``text`` saved as the run's artifact ``artifact_file_path`` (a relative posix path)."""
        path = _name(artifact_file_path, "log_text() artifact_file_path")
        if path.startswith("/") or ".." in path.split("/"):
            raise ConfigError(f"log_text() artifact_file_path must be a relative path inside the run, got {path!r}")
        if not isinstance(text, str):
            raise ConfigError(f"log_text() text must be str, got {type(text).__name__}")
        self._send(path, text, None, "text")

    @staticmethod
    def _values(values: Any, where: str) -> dict[str, Any]:
        if not isinstance(values, Mapping) or not values:
            raise ConfigError(f"{where} must be a non-empty dict, got {type(values).__name__}")
        return {_name(k, f"a key of {where}"): _param(v, f"{where}[{k!r}]") for k, v in values.items()}


class WandBWriter(_Writer):
    """W&B's ``wandb.log`` call, recorded in the job's W&B offline runs at the broker."""

    writer = WANDB

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self._send("metrics", _numbers(metrics, "metrics"), _step(step, "step of metrics"), "metrics")
