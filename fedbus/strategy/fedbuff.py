"""FedBuff: asynchronous buffered aggregation (Nguyen et al., AISTATS 2022, Algorithm 1).

Theory of operation
-------------------
Phases: ``new`` -> ``train`` -> (``evaluate``) -> ``done``.

* Busy sites: up to ``concurrency`` sites hold a task at any moment, at most one each. Whenever a slot
  frees (a result, a failure, a site leaving, a site joining) idle sites are dispatched the CURRENT
  version, least recently dispatched first (ties by name): when sites <= concurrency this is exactly
  "the site that just reported is re-dispatched at once"; when there are more sites, every site takes
  its turn. Training tasks are never interrupted by a new version: their staleness is the price.
* A training result must be DIFF (``local - global``): a FULL result is Rejected, because turning it
  into a delta needs the exact base model, and a stale base may no longer be held. Its staleness is
  ``s = version - base_version`` (base from our own record of the task). ``s > max_staleness`` is
  Rejected and counted in ``dropped_stale``; otherwise the delta is checked (names/shapes/dtypes,
  NaN/Inf) and folded into ONE running buffer with coefficient ``c = staleness_fn(s)`` (the paper does
  not weight by data size; with ``weight_by_samples`` c is multiplied by the update's weight).
* After ``buffer_size`` = K accepted updates: ``delta = buffer / K`` (``/ sum of weights`` with
  ``weight_by_samples``, so equal weights give the same result), the server optimizer moves the
  global model (sgd with momentum, or adam; ``server_opt``), version += 1, :class:`Publish`, and a
  fresh buffer starts. Integer/bool tensors in deltas are skipped: the global keeps their value.
  K = 1, constant staleness and lr = 1 is FedAsync-style immediate application: global += delta.
* A site whose last ``max_task_failures`` tasks all failed (``task_failed``; not counting a task on an older
  version lost to a restart of its daemon, ``blame=False``: a daemon crashing in a loop is its supervisor's to
  stop, and a task sent again after a restart that fails still counts) gets no more tasks until
  it leaves and joins again (otherwise a broken script would be re-dispatched in a tight loop); when
  every available site is benched and none is busy, the job Fails, naming the last failure.
* Stop: after ``num_versions`` versions, or when ``now - start >= time_budget`` (fired by any event;
  ``next_deadline`` tells the shell when to ``tick``). Pending training tasks get :class:`Cancel`; the
  partly filled buffer is dropped. With ``evaluate_every = k`` every available site then evaluates the
  final version (bounded by ``eval_timeout`` when given; the time budget bounds training only) and the
  job finishes when all answered, failed or left. Every k-th version in between, each site evaluates
  once, taking the current version the next time it is idle (evaluate before train).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import torch

from fedbus.errors import ConfigError, StrategyError
from fedbus.strategy._config import check_choice, check_float, check_int, check_opt_float, check_opt_int
from fedbus.strategy._tasks import TaskBook
from fedbus.strategy.aggregate import MetricMean, finalize_mean, make_staleness_fn, weighted_sum_into
from fedbus.strategy.base import (
    Accepted,
    Action,
    Cancel,
    Evaluated,
    Failed,
    Finished,
    Params,
    ParamsType,
    Publish,
    Rejected,
    Strategy,
    Update,
    check_update_fields,
    clean_metrics,
    copy_model,
)
from fedbus.strategy.server_opt import ServerAdam, ServerOptimizer, ServerSGD

Phase = Literal["new", "train", "evaluate", "done"]
_OWNER = "FedBuff"


class FedBuff(Strategy):
    """Buffered asynchronous aggregation; see the module docstring for the theory of operation."""

    params_type: ClassVar[ParamsType] = "DIFF"
    restores_updates: ClassVar[bool] = True

    def __init__(
        self,
        concurrency: int,
        buffer_size: int,
        num_versions: int | None = None,
        max_staleness: int | None = None,
        staleness: str = "polynomial",
        staleness_kwargs: dict[str, float] | None = None,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        server_optimizer: Literal["sgd", "adam"] = "sgd",
        adam_betas: Sequence[float] = (0.9, 0.99),
        adam_eps: float = 1e-8,
        time_budget: float | None = None,
        evaluate_every: int = 0,
        weight_by_samples: bool = False,
        eval_timeout: float | None = None,
        max_task_failures: int = 3,
    ) -> None:
        self.concurrency = check_int(_OWNER, "concurrency", concurrency, minimum=1)
        self.buffer_size = check_int(_OWNER, "buffer_size", buffer_size, minimum=1)
        self.num_versions = check_opt_int(_OWNER, "num_versions", num_versions, minimum=1)
        self.max_staleness = check_opt_int(_OWNER, "max_staleness", max_staleness, minimum=0)
        self.time_budget = check_opt_float(_OWNER, "time_budget", time_budget, gt=0)
        self.eval_timeout = check_opt_float(_OWNER, "eval_timeout", eval_timeout, gt=0)
        self.evaluate_every = check_int(_OWNER, "evaluate_every", evaluate_every, minimum=0)
        self.max_task_failures = check_int(_OWNER, "max_task_failures", max_task_failures, minimum=1)
        if self.num_versions is None and self.time_budget is None:
            raise ConfigError(f"{_OWNER}: needs a stop condition: num_versions or time_budget")
        if not isinstance(weight_by_samples, bool):
            raise ConfigError(f"{_OWNER}: weight_by_samples must be true or false, got {weight_by_samples!r}")
        self.weight_by_samples = weight_by_samples
        if staleness_kwargs is not None and not isinstance(staleness_kwargs, dict):
            raise ConfigError(f"{_OWNER}: staleness_kwargs must be a table, got {staleness_kwargs!r}")
        self._staleness = make_staleness_fn(
            check_choice(_OWNER, "staleness", staleness, ["constant", "polynomial", "hinge"]),
            **(staleness_kwargs or {}),
        )
        self._opt = _make_optimizer(server_optimizer, server_lr, server_momentum, adam_betas, adam_eps)
        self._book = TaskBook()
        self._sites: set[str] = set()
        self._idle: set[str] = set()  # the sites of _sites with no task, as of the last _fill
        self._queue: list[tuple[bool, int, str]] = []  # idle sites by _fill's order (stale entries skipped)
        self._last_dispatch: dict[str, int] = {}
        self._eval_due: set[str] = set()
        self._fail_streak: dict[str, tuple[int, str]] = {}  # site -> (consecutive failures, last reason)
        self._phase: Phase = "new"
        self._version = 0
        self._global: dict[str, torch.Tensor] = {}
        self._budget_end: float | None = None
        self._eval_end: float | None = None
        self._final = {"dispatched": 0, "reported": 0}
        self._stop_reason = ""
        self._totals = {"accepted": 0, "dropped_stale": 0, "rejected": 0, "failed_tasks": 0, "evaluated": 0}
        self._staleness_hist: dict[int, int] = {}
        self._updates_per_version: dict[int, int] = {}
        self._reset_buffer()

    def _reset_buffer(self) -> None:
        self._buffer: dict[str, torch.Tensor] = {}
        self._buf_count = 0
        self._buf_weight = 0.0
        self._buf_staleness: list[int] = []
        self._buf_metrics = MetricMean()
        self._buf_dropped = 0

    # ---- the Strategy interface -------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    @property
    def model(self) -> Params:
        return MappingProxyType(self._global)

    @property
    def done(self) -> bool:
        return self._phase == "done"

    @property
    def next_deadline(self) -> float | None:
        return {"train": self._budget_end, "evaluate": self._eval_end}.get(self._phase)

    def start(self, model: Params, sites: Sequence[str], now: float, *, version: int = 0) -> list[Action]:
        if self._phase != "new":
            raise StrategyError("FedBuff.start() called twice")
        if isinstance(sites, str):
            raise StrategyError("sites must be a sequence of site names, not one string")
        self._global = copy_model(model)
        self._version = check_int(_OWNER, "version", version, minimum=0)
        self._sites = set(sites)
        self._idle = set(self._sites)
        self._requeue()
        self._phase = "train"
        self._budget_end = None if self.time_budget is None else now + self.time_budget
        if self.num_versions is not None and self._version >= self.num_versions:
            return self._end_training(now, f"version {self._version} already reached num_versions={self.num_versions}")
        return self._fill()

    def site_joined(self, site: str, now: float) -> list[Action]:
        acts = self._events_start(now)
        if self._phase == "train" and site not in self._sites:
            self._sites.add(site)
            self._idle.add(site)
            heapq.heappush(self._queue, self._order(site))
            acts += self._fill()
        return acts

    def site_left(self, site: str, now: float) -> list[Action]:
        acts = self._events_start(now)
        self._sites.discard(site)
        self._idle.discard(site)
        self._eval_due.discard(site)
        self._fail_streak.pop(site, None)  # a site that comes back starts with a clean slate
        if self._book.close_site(site, f"site {site!r} left before answering") is not None:
            acts += self._after_slot_freed(now)
        return acts

    def task_failed(self, site: str, task_id: str, reason: str, now: float, *, blame: bool = True) -> list[Action]:
        acts = self._events_start(now)
        task = self._book.pending_for(site)
        if task is None or task.task_id != task_id:
            return acts
        self._book.close(task_id, f"task {task_id} had already failed: {reason}")
        self._totals["failed_tasks"] += 1
        if blame:
            self._fail_streak[site] = (self._fail_streak.get(site, (0, ""))[0] + 1, reason)
        return acts + self._after_slot_freed(now)

    def on_update(self, update: Update, now: float) -> list[Action]:
        acts = self._events_start(now)
        if self._phase == "done":
            return [*acts, self._reject(update, "the job has ended")]
        claimed = self._book.claim(update)
        if isinstance(claimed, str):
            return [*acts, self._reject(update, claimed)]
        task = claimed
        self._fail_streak.pop(task.site, None)
        if task.kind == "evaluate":
            self._totals["evaluated"] += 1
            if self._phase == "evaluate":
                self._final["reported"] += 1
            acts.append(Evaluated(task.version, task.site, clean_metrics(update.metrics)))
        else:
            acts += self._train_result(update, task.version)
        return acts + self._after_slot_freed(now)

    def restore(self, update: Update) -> list[Action]:
        """An update a previous broker accepted into a buffer it never applied: folded exactly as ``on_update``
        would, staleness counted from its base version, without a task. Its base must exist again by now
        (the checkpoint, or a version the updates replayed before it rebuilt); otherwise it is Rejected."""
        if self._phase != "train":
            if self._phase == "new":
                raise StrategyError("FedBuff: call start() before restore()")
            return [self._reject(update, f"training has ended ({self._stop_reason})")]
        if isinstance(update.base_version, bool) or not isinstance(update.base_version, int):
            return [self._reject(update, f"base_version must be an int, got {update.base_version!r}")]
        if update.base_version > self._version:
            return [self._reject(update, f"trained from version {update.base_version}, which the broker lost")]
        return self._train_result(update, update.base_version)

    def recount(self, updates: Sequence[Mapping[str, Any]], evaluations: int) -> None:
        """The counters of a job resumed from a checkpoint (see ``Strategy.recount``): ``accepted``,
        ``staleness_hist`` and ``updates_per_version`` count the accepted updates the checkpoint holds (those that
        landed in it or before: an update accepted at base b with staleness s lands in version b + s + 1; the ones
        after it come back through ``restore`` and count themselves); ``dropped_stale`` the updates refused as
        stale; ``evaluated`` the recorded evaluations. ``rejected`` and ``failed_tasks`` count from the restart
        (the records do not tell a refused update from a failed task)."""
        if self._phase == "new":
            raise StrategyError("FedBuff: call start() before recount()")
        landed = [
            u
            for u in updates
            if u.get("accepted") and isinstance(u.get("version"), int) and isinstance(u.get("staleness"), int)
        ]
        landed = [u for u in landed if u["version"] + u["staleness"] + 1 <= self._version]
        self._totals["accepted"] = len(landed)
        self._staleness_hist = dict(Counter(u["staleness"] for u in landed))
        self._updates_per_version = dict(Counter(u["version"] for u in landed))
        stale = [u for u in updates if not u.get("accepted") and str(u.get("reason", "")).startswith("stale:")]
        self._totals["dropped_stale"] = len(stale)
        self._totals["evaluated"] = evaluations

    def tick(self, now: float) -> list[Action]:
        return self._events_start(now)

    def state(self) -> dict[str, object]:
        """Counters; ``staleness_hist`` maps s -> accepted updates (drops are in ``dropped_stale``),
        ``updates_per_version`` maps a base version -> accepted updates trained from it."""
        return {
            "strategy": "fedbuff",
            "phase": self._phase,
            "version": self._version,
            "sites": len(self._sites),
            "busy": len(self._book),
            "buffered": self._buf_count,
            **self._totals,
            # str keys: the state travels in status replies, and the envelope decoder takes str map keys only
            "staleness_hist": {str(k): v for k, v in sorted(self._staleness_hist.items())},
            "updates_per_version": {str(k): v for k, v in self._updates_per_version.items()},
        }

    # ---- training results ----------------------------------------------------------------------------

    def _train_result(self, update: Update, base: int) -> list[Action]:
        reason = check_update_fields(update, base)
        if reason is None and (update.params is None or update.params_type != "DIFF"):
            got = "no params" if update.params is None else "FULL params"
            reason = f"FedBuff needs DIFF params (local - global) for training results, got {got}"
        s = self._version - base
        if reason is None and self.max_staleness is not None and s > self.max_staleness:
            self._totals["dropped_stale"] += 1
            self._buf_dropped += 1
            return [Rejected(update.task_id, update.site, f"stale: s={s} > max_staleness={self.max_staleness}")]
        if reason is None:
            reason = self.validate_input(self.input_reference(), update.params)  # type: ignore[arg-type]
        if reason is not None:
            return [self._reject(update, reason)]
        coef = self._staleness(s)
        if self.weight_by_samples:
            coef *= float(update.weight)
        reason = self._fold_update(update.params, coef)  # type: ignore[arg-type]
        if reason is not None:
            return [self._reject(update, reason)]
        self._buf_count += 1
        self._buf_weight += float(update.weight)
        self._buf_staleness.append(s)
        self._buf_metrics.add(clean_metrics(update.metrics), float(update.weight))
        self._totals["accepted"] += 1
        self._staleness_hist[s] = self._staleness_hist.get(s, 0) + 1
        self._updates_per_version[base] = self._updates_per_version.get(base, 0) + 1
        acts: list[Action] = [Accepted(update.task_id, update.site, base, s, coef)]
        if self._buf_count >= self.buffer_size:
            acts += self._apply_buffer()
        return acts

    def _fold_update(self, params: Params, coef: float) -> str | None:
        """Add ``coef * params`` (a checked delta) to the buffer (the fold an encrypted job replaces); the reason it
        could not be folded after all (nothing of it was: ciphertexts are loaded only while folding), or None."""
        weighted_sum_into(self._buffer, params, coef, integers="skip")
        return None

    def _next_global(self) -> dict[str, torch.Tensor]:
        """The global model after applying the full buffer: its mean delta through the server optimizer."""
        delta = finalize_mean(self._buffer, self._buf_weight if self.weight_by_samples else float(self._buf_count))
        return self._opt.step(self._global, delta)

    def _apply_buffer(self) -> list[Action]:
        k = self._buf_count
        new_global = self._next_global()
        metrics = {
            **self._buf_metrics.result(),
            "strategy/num_updates": float(k),
            "strategy/mean_staleness": sum(self._buf_staleness) / k,
            "strategy/max_staleness": float(max(self._buf_staleness)),
            "strategy/dropped_stale": float(self._buf_dropped),
        }
        self._global = new_global
        self._version += 1
        self._reset_buffer()
        if self.evaluate_every and self._version % self.evaluate_every == 0:
            self._eval_due = set(self._sites)
            self._requeue()
        return [Publish(self._version, self._global, metrics)]

    def _reject(self, update: Update, reason: str) -> Rejected:
        self._totals["rejected"] += 1
        return Rejected(update.task_id, update.site, reason)

    # ---- scheduling and stopping ---------------------------------------------------------------------

    def _events_start(self, now: float) -> list[Action]:
        """Every event first fires a due deadline, so nothing is accepted past the time budget."""
        if self._phase == "new":
            raise StrategyError("FedBuff: call start() before any other event")
        if self._phase == "train" and self._budget_end is not None and now >= self._budget_end:
            return self._end_training(now, f"time budget of {self.time_budget:g} s spent at version {self._version}")
        if self._phase == "evaluate" and self._eval_end is not None and now >= self._eval_end:
            return self._finish(f"{self._stop_reason}; final evaluation timed out")
        return []

    def _after_slot_freed(self, now: float) -> list[Action]:
        if self._phase == "train" and self.num_versions is not None and self._version >= self.num_versions:
            return self._end_training(now, f"num_versions={self.num_versions} reached")
        if self._phase == "train":
            acts = self._fill()
            if len(self._book) == 0 and self._sites and all(map(self._benched, self._sites)):
                site = max(self._sites, key=lambda s: (self._fail_streak[s][0], s))
                why = f"no site can take a task: each failed its last {self.max_task_failures} tasks"
                acts += self._finish(f"{why} (last at {site!r}: {self._fail_streak[site][1]})", Failed)
            return acts
        if self._phase == "evaluate" and len(self._book) == 0:
            return self._finish(self._stop_reason)
        return []

    def _fill(self) -> list[Action]:
        """Dispatch the current version to idle sites until ``concurrency`` are busy."""
        free = self.concurrency - len(self._book)
        if free <= 0:
            return []
        # Idle sites are kept as they change (joins, and sites whose task closed), not found by going over every
        # site: that would run once per update and grow with the sites. In training, tasks are issued only
        # here, so a site freed since the last call is idle now; one that left is not taken back.
        # They wait in a heap by (not due an evaluation, last dispatch, name), so a dispatch costs log(sites), not a
        # sort of every idle site; an entry whose site is no longer idle, or whose order changed, is dropped.
        freed = (self._book.take_freed() & self._sites) - self._idle
        self._idle |= freed
        for site in sorted(freed):
            heapq.heappush(self._queue, self._order(site))
        chosen: list[str] = []
        benched: list[tuple[bool, int, str]] = []
        while self._queue and len(chosen) < free:
            entry = heapq.heappop(self._queue)
            site = entry[2]
            if site not in self._idle or site in chosen or entry != self._order(site):
                continue
            if self._benched(site):
                benched.append(entry)
            else:
                chosen.append(site)
        for entry in benched:
            heapq.heappush(self._queue, entry)
        acts: list[Action] = []
        for site in chosen:
            kind: Literal["train", "evaluate"] = "evaluate" if site in self._eval_due else "train"
            self._eval_due.discard(site)
            self._last_dispatch[site] = self._book.issued
            self._idle.discard(site)
            acts.append(self._book.issue(site, self._version, kind))
        return acts

    def _order(self, site: str) -> tuple[bool, int, str]:
        """Where an idle site stands in line for a task: evaluations due first, then least recently dispatched."""
        return (site not in self._eval_due, self._last_dispatch.get(site, -1), site)

    def _requeue(self) -> None:
        self._queue = [self._order(s) for s in self._idle]
        heapq.heapify(self._queue)

    def _benched(self, site: str) -> bool:
        return self._fail_streak.get(site, (0, ""))[0] >= self.max_task_failures

    def _end_training(self, now: float, reason: str) -> list[Action]:
        acts = self._cancel_pending(f"training ended: {reason}")
        self._reset_buffer()
        self._stop_reason = reason
        if not self.evaluate_every:
            return acts + self._finish(reason)
        self._phase = "evaluate"
        self._eval_end = None if self.eval_timeout is None else now + self.eval_timeout
        acts += [self._book.issue(s, self._version, "evaluate") for s in sorted(self._sites)]
        self._final["dispatched"] = len(self._sites)
        return acts + self._after_slot_freed(now)

    def _finish(self, reason: str, end: type[Finished | Failed] = Finished) -> list[Action]:
        if self._phase == "evaluate":
            reason += f"; final evaluation: {self._final['reported']} of {self._final['dispatched']} sites reported"
        acts = self._cancel_pending(f"job ended: {reason}")
        self._phase = "done"
        return [*acts, end(reason)]

    def _cancel_pending(self, why: str) -> list[Action]:
        acts: list[Action] = []
        for task in self._book.pending():
            self._book.close(task.task_id, f"stale: task {task.task_id} for version {task.version} arrived after {why}")
            acts.append(Cancel(task.site, task.task_id, why))
        return acts


def _make_optimizer(kind: object, lr: object, momentum: object, betas: object, eps: object) -> ServerOptimizer:
    """The server optimizer named by ``kind``, with every argument checked (ConfigError names it)."""
    kind = check_choice(_OWNER, "server_optimizer", kind, ["sgd", "adam"])
    lr_ = check_float(_OWNER, "server_lr", lr, gt=0)
    m = check_float(_OWNER, "server_momentum", momentum, ge=0, lt=1)
    if kind == "sgd":
        return ServerSGD(lr_, m)
    if m:
        raise ConfigError(f"{_OWNER}: server_momentum applies to sgd; adam takes adam_betas")
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ConfigError(f"{_OWNER}: adam_betas must be two numbers, got {betas!r}")
    b1 = check_float(_OWNER, "adam_betas[0]", betas[0], ge=0, lt=1)
    b2 = check_float(_OWNER, "adam_betas[1]", betas[1], ge=0, lt=1)
    return ServerAdam(lr_, (b1, b2), check_float(_OWNER, "adam_eps", eps, gt=0))
