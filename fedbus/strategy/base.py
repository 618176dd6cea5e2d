"""Value types and the event-driven interface every aggregation strategy implements.

Why events and not a loop: Flower's base strategy hard-codes a synchronous round loop and blocks in
``sleep``, so an asynchronous strategy (FedBuff) cannot fit it. Here a strategy is a state machine in
the h11 manner: the controller (the IO shell in ``fedbus.broker``) feeds it events -- ``start``,
``site_joined``, ``site_left``, ``on_update``, ``task_failed``, ``tick`` -- each with the current time
as ``now``, and executes the :data:`Action` values it gets back, in order. A strategy never touches a
socket, never sleeps, never reads a clock and never logs; it returns decisions instead.

Contract for every strategy:

* Inputs are read-only: a strategy never writes into an :class:`Update`'s tensors or into the model
  given to ``start`` (it keeps its own copy).
* Every :class:`Publish` carries fresh tensors; the strategy never modifies them afterwards, so the
  controller may checkpoint and stream them while the strategy keeps going.
* Every :class:`Dispatch` is answered by the controller with exactly one of ``on_update`` (the result),
  ``task_failed`` (the script crashed or the upload was refused) or ``site_left`` (the site is gone).
* Deadlines are fired inside *every* event (not only ``tick``), so a late ``tick`` cannot let a result
  slip in after its round closed; ``next_deadline`` says when ``tick`` is due at the latest.
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeAlias

import torch

from fedbus.errors import StrategyError
from fedbus.protocol.messages import Message

ParamsType = Literal["FULL", "DIFF"]
TaskKind = Literal["train", "evaluate", "submit_model"]
Params: TypeAlias = Mapping[str, torch.Tensor]


@dataclass(frozen=True, eq=False)
class Update:
    """One result from a site, as the controller decoded it from the wire (still untrusted).

    ``params`` is None for metrics-only evaluation results. ``weight`` is the site's data weight
    (NUM_STEPS_CURRENT_ROUND); strategies refuse it unless it is finite and > 0. ``base_version`` is
    what the site claims it trained from; strategies check it against the version they dispatched.
    """

    site: str
    task_id: str
    base_version: int
    params: Params | None
    params_type: ParamsType
    weight: float = 1.0
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Dispatch:
    """Send global model ``version`` to ``site`` as task ``task_id`` (train on it, or evaluate it).

    ``model``, when set, is streamed instead of the global version: a model other than the global one to
    evaluate (cross-site evaluation), cached by the controller under ``model_name`` for every site that gets
    it. A ``submit_model`` task (the site sends its local model back) carries no model.
    """

    site: str
    task_id: str
    version: int
    kind: TaskKind = "train"
    model: Params | None = field(default=None, compare=False, repr=False)  # tensors: compared by model_name
    model_name: str = ""


@dataclass(frozen=True, eq=False)
class Publish:
    """Global model ``version`` now exists: checkpoint it, stream it to whoever asks.

    ``metrics`` holds the weighted mean of the metrics the aggregated updates reported plus strategy
    counters under ``strategy/...`` keys. The tensors are never modified by the strategy afterwards.
    """

    version: int
    model: Params
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class Accepted:
    """Update ``task_id`` went into the aggregate.

    ``version`` is the global version the task carried (the one the site trained from); ``staleness``
    is how many versions the global had advanced past it on arrival; ``weight`` is the coefficient the
    update was folded in with (FedAvg: the data weight; FedBuff: the staleness weight, times the data
    weight when ``weight_by_samples``).
    """

    task_id: str
    site: str
    version: int
    staleness: int
    weight: float


@dataclass(frozen=True)
class Rejected:
    """An update was refused and did not touch the aggregate; ``reason`` says why (for the log)."""

    task_id: str
    site: str
    reason: str


@dataclass(frozen=True)
class Evaluated:
    """Site ``site`` evaluated global ``version`` and reported ``metrics`` (finite numbers only); ``model_name``
    names the model evaluated when it was not the global version (cross-site evaluation)."""

    version: int
    site: str
    metrics: Mapping[str, float]
    model_name: str = ""


@dataclass(frozen=True)
class Cancel:
    """Task ``task_id`` at ``site`` is no longer wanted (round closed, job ended): stop it if possible.

    Purely advisory: a result that still arrives is answered with :class:`Rejected`.
    """

    site: str
    task_id: str
    reason: str


@dataclass(frozen=True)
class Finished:
    """The job reached its goal; no more actions follow."""

    reason: str


@dataclass(frozen=True)
class Failed:
    """The job cannot continue (e.g. too few results for a round); no more actions follow."""

    reason: str


@dataclass(frozen=True)
class Relay:
    """Send ``message`` to ``site`` as it is: a step of a protocol the strategy runs with its sites (secure
    aggregation's keys, shares and unmasking). The controller fills in the job's id (``message.job_id``)."""

    site: str
    message: Message


Action: TypeAlias = Dispatch | Publish | Accepted | Rejected | Evaluated | Cancel | Finished | Failed | Relay

_MAX_NAMES = 5


def _names(names: Sequence[object]) -> str:
    """A short list of tensor names for a reason string (an attacker may send thousands)."""
    shown = ", ".join(repr(n) for n in list(names)[:_MAX_NAMES])
    more = len(names) - _MAX_NAMES
    return f"[{shown}{f', ... {more} more' if more > 0 else ''}]"


def validate_update(reference: Params, params: Params) -> str | None:
    """Why ``params`` cannot be aggregated into ``reference``, or None when it can.

    Names, dtypes, shapes, device and layout must match exactly (the global model is the contract), and
    every floating or complex tensor must be finite: one NaN would poison the global model for good.
    Structure is checked for every tensor before any values are scanned, as it is far cheaper.
    """
    if not isinstance(params, Mapping):
        return f"params must be a mapping of tensors, got {type(params).__name__}"
    missing = [k for k in reference if k not in params]
    if missing:
        return f"missing tensors: {_names(missing)}"
    extra = [k for k in params if k not in reference]
    if extra:
        return f"unexpected tensors: {_names(extra)}"
    # A lazy mapping (an update spooled to disk) may describe a tensor without loading it: the structure
    # check then costs nothing, and only the finiteness scan below reads the data.
    describe = getattr(params, "describe", params.__getitem__)
    for name, ref in reference.items():
        t = describe(name)
        if not isinstance(t, torch.Tensor):
            return f"{name!r} is not a tensor but {type(t).__name__}"
        if t.dtype != ref.dtype:
            return f"dtype mismatch for {name!r}: expected {ref.dtype}, got {t.dtype}"
        if t.shape != ref.shape:
            return f"shape mismatch for {name!r}: expected {tuple(ref.shape)}, got {tuple(t.shape)}"
        # A meta reference (an ``input_spec``) describes names, dtypes and shapes only, not a device.
        if t.layout != torch.strided or (t.device != ref.device and not t.is_meta and not ref.is_meta):
            return f"{name!r} must be a dense tensor on {ref.device}, got {t.layout} on {t.device}"
    scanned = getattr(params, "nonfinite", None)  # the receiving sink checked the bytes as they arrived
    if scanned is not None:
        return f"non-finite values (NaN/Inf) in {scanned[0]!r}" if scanned else None
    for name, t in params.items():
        if (t.is_floating_point() or t.is_complex()) and not _all_finite(t):
            return f"non-finite values (NaN/Inf) in {name!r}"
    return None


def _all_finite(t: torch.Tensor) -> bool:
    """Every element finite. A NaN or Inf anywhere makes the sum NaN or Inf, so the sum (one fast pass, no
    temporary the size of ``t``) settles almost every tensor; only a sum that overflowed from finite
    values needs the exact elementwise check."""
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def check_update_fields(update: Update, expected_version: int) -> str | None:
    """Why the scalar fields of ``update`` are unacceptable, or None.

    ``expected_version`` is the version the strategy dispatched with the task: a site that claims
    another base version is confused (or lying) about what it trained from.
    """
    if update.params_type not in ("FULL", "DIFF"):
        return f"params_type must be 'FULL' or 'DIFF', got {update.params_type!r}"
    w = update.weight
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w <= 0:
        return f"weight must be a finite number > 0, got {w!r}"
    if update.base_version != expected_version:
        return (
            f"base_version mismatch: task {update.task_id} carried version {expected_version}, "
            f"the update claims {update.base_version!r}"
        )
    return None


def clean_metrics(metrics: object) -> dict[str, float]:
    """The finite real-valued entries of an untrusted metrics mapping, as floats; the rest is dropped."""
    if not isinstance(metrics, Mapping):
        return {}
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(k, str) and isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def copy_model(model: Params) -> dict[str, torch.Tensor]:
    """A private, detached copy of the caller's model, so later changes on either side never leak."""
    if not isinstance(model, Mapping) or not model:
        raise StrategyError("model must be a non-empty mapping of name -> tensor")
    out: dict[str, torch.Tensor] = {}
    for name, t in model.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise StrategyError(f"model entry {name!r} must map a str to a tensor")
        out[name] = t.detach().clone()
    return out


class Strategy(abc.ABC):
    """An aggregation rule as a state machine over events; see the module docstring for the contract.

    There is deliberately no round loop here: FedAvg (a barrier) and FedBuff (a buffer with staleness)
    share only the event vocabulary. A call before ``start`` raises :class:`StrategyError` (a bug in the
    controller); calls after the job ended return ``[]`` (or :class:`Rejected` for updates).

    ``params_type`` tells the controller what training results sites should send: FedAvg takes
    either and asks for FULL; FedBuff refuses anything but DIFF.
    """

    params_type: ClassVar[ParamsType] = "FULL"
    restores_updates: ClassVar[bool] = False
    """True when an accepted update may wait for a later aggregate (FedBuff's buffer): the controller then keeps
    it on disk until a checkpoint covers it and, after a restart, hands it back through :meth:`restore`."""

    def client_options(self) -> dict[str, Any]:
        """Plain values every task of this job carries to the script's client API (``Task.options``): FedProx's
        ``fedprox_mu``, SCAFFOLD's ``scaffold`` flag. The job's ``[client]`` table is merged over them."""
        return {}

    def input_spec(self) -> Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None:
        """The names, dtypes and shapes a training result must carry, when they are not the global model's.

        The aggregator extension point: a strategy whose sites send something other than weights (FedAvgLr's
        gradient and Hessian) declares it here, and the broker checks every offer against it before it takes a
        payload byte. None (the default) means "the global model's tensors"."""
        return None

    def input_reference(self) -> Params:
        """What :meth:`validate_input` checks a result against: the tensors ``input_spec`` declares, as meta tensors
        (names, dtypes and shapes, no data), or the current global model when it declares none."""
        spec = self.input_spec()
        if spec is None:
            return self.model
        return {name: torch.empty(shape, dtype=dtype, device="meta") for name, (dtype, shape) in spec.items()}

    def validate_input(self, reference: Params, params: Params) -> str | None:
        """Why ``params`` of a result cannot be taken, or None. ``reference`` is the global model, or the
        tensors ``input_spec`` declares (as meta tensors). The default demands exactly the reference's names,
        dtypes and shapes and finite values (:func:`validate_update`)."""
        return validate_update(reference, params)

    def restore(self, update: Update) -> list[Action]:
        """Fold again an update accepted before a restart, right after ``start`` from the last checkpoint and in
        the order the updates were first accepted; it has no task to claim. Only where ``restores_updates``."""
        raise StrategyError(f"{type(self).__name__} does not restore updates: a restart redoes its aggregate")

    def recount(self, updates: Sequence[Mapping[str, Any]], evaluations: int) -> None:
        """After ``start`` from a checkpoint and before any ``restore``: the job's counters go on from what the
        broker recorded (``updates``: the store's update records, ``task_id site version accepted staleness
        reason``; ``evaluations``: evaluation results recorded), so that ``state()`` counts across restarts. Only
        where ``restores_updates``; the default keeps counting from zero."""
        del updates, evaluations  # nothing to go on from: this strategy's counters start with each process

    @abc.abstractmethod
    def start(self, model: Params, sites: Sequence[str], now: float, *, version: int = 0) -> list[Action]:
        """Begin from ``model`` as global ``version`` (non-zero when resuming from a checkpoint)."""

    @abc.abstractmethod
    def site_joined(self, site: str, now: float) -> list[Action]:
        """A site became available (idempotent)."""

    @abc.abstractmethod
    def site_left(self, site: str, now: float) -> list[Action]:
        """A site is gone; its outstanding task, if any, is lost."""

    @abc.abstractmethod
    def on_update(self, update: Update, now: float) -> list[Action]:
        """A result arrived for a task this strategy dispatched (or claims to)."""

    @abc.abstractmethod
    def task_failed(self, site: str, task_id: str, reason: str, now: float, *, blame: bool = True) -> list[Action]:
        """A dispatched task will never produce a result (script crashed, upload refused). ``blame`` is False
        when the site is not at fault (its daemon restarted and lost the task): it counts as failed, but not
        toward benching a site."""

    @abc.abstractmethod
    def tick(self, now: float) -> list[Action]:
        """Fire deadlines that are due (round timeout, time budget); a no-op when none is."""

    @property
    @abc.abstractmethod
    def version(self) -> int:
        """The current global model version."""

    @property
    @abc.abstractmethod
    def model(self) -> Params:
        """The current global model (read-only by convention; the same tensors as the last Publish)."""

    @property
    @abc.abstractmethod
    def done(self) -> bool:
        """True once Finished or Failed was returned."""

    @property
    @abc.abstractmethod
    def next_deadline(self) -> float | None:
        """The time by which ``tick`` must be called, or None when no deadline is pending."""

    @abc.abstractmethod
    def state(self) -> dict[str, object]:
        """Plain counters for status displays and metrics (JSON-serializable values)."""
