"""FedAvg (McMahan et al., 2017) as an event-driven barrier.

Theory of operation
-------------------
Phases: ``new`` -> ``waiting`` | ``train`` -> (``evaluate``) -> ``train`` ... -> ``done``.

* A round trains from global version v. It starts as soon as at least ``min_clients`` sites are
  available (``start`` or ``site_joined``; until then the phase is ``waiting``, with no deadline). It
  dispatches v to up to ``max_clients`` sites taken from the sorted site names, rotated by
  ``v * max_clients`` so that every site takes its turn while the choice stays reproducible. Sites
  joining mid-round wait for the next round, except one that comes back during the round (or evaluation)
  in which its task was lost (it left before answering, or the task failed, as when its daemon stopped and
  took the script with it): it gets the task again, once per round. A site that lost its connection or
  restarted is not what a barrier of all sites should fail for; a late answer to the first task is Rejected
  as stale, so nothing is counted twice. Only a return brings a task back, so a script that keeps failing on
  a site that stays is never re-dispatched in a loop.
* Each result is checked (task, site, base version, weight, names/shapes/dtypes, NaN/Inf) and folded
  into ONE running weighted sum as it arrives. The sum lives in the space of the round's first accepted
  update: FULL (new = sum / W) or DIFF (new = global + sum / W); an update of the other type is
  converted on the fly by also folding ``-/+ weight * global``. Integer/bool tensors are not averaged:
  from FULL updates the new global takes their elementwise max, DIFF updates leave them alone (module
  docstring of ``aggregate``).
* The round closes when no dispatched task is pending (each one answered, failed, or its site left) or
  at ``round_timeout``. With >= ``min_clients`` accepted results: version v + 1 is published, pending
  stragglers get :class:`Cancel` (a late answer is Rejected as stale), and the next round (or an
  evaluation) starts at once. With fewer: :class:`Failed`, naming the round and the counts.
* ``evaluate_every = k``: after every k-th version and after the last, every available site gets an
  ``evaluate`` task for the new version; results come back as :class:`Evaluated` and never touch the
  model. The evaluation is a barrier too (same timeout); the job finishes after the final one.
* Rounds are numbered from 1 in messages: round r trains from version r - 1.
* ``time_budget = T`` (seconds from ``start``): training stops at the first round boundary at or after T
  (the round that just closed is published), or at T itself when a round is still open (fired by any
  event; ``next_deadline`` includes T): that round's pending tasks get :class:`Cancel` and its partial
  aggregate is dropped, so a round never publishes from fewer results than the barrier asked for. With
  ``evaluate_every`` the version reached is then evaluated (unless it just was) before :class:`Finished`;
  the budget bounds training only, like FedBuff's.

Subclasses (FedProx, SCAFFOLD, FedOpt, FedAvgLr) keep this barrier and change only what a result must
be (``_check_result``), how it is folded (``_accumulate``) and how the round's aggregate becomes the next
global model (``_finish_aggregate``, which may raise :class:`StrategyError` to fail the round).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType
from typing import ClassVar, Literal

import torch

from fedbus.errors import StrategyError
from fedbus.strategy._config import check_int, check_opt_float, check_opt_int
from fedbus.strategy._tasks import TaskBook
from fedbus.strategy.aggregate import MetricMean, finalize_mean, weighted_sum_into
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

Phase = Literal["new", "waiting", "train", "evaluate", "done"]


class FedAvg(Strategy):
    """Synchronous federated averaging; see the module docstring for the theory of operation."""

    name: ClassVar[str] = "fedavg"
    """The strategy's name in ``state()`` (its key in ``STRATEGIES``)."""

    def __init__(
        self,
        min_clients: int,
        num_rounds: int,
        max_clients: int | None = None,
        round_timeout: float | None = None,
        evaluate_every: int = 0,
        time_budget: float | None = None,
    ) -> None:
        owner = type(self).__name__
        self.min_clients = check_int(owner, "min_clients", min_clients, minimum=1)
        self.num_rounds = check_int(owner, "num_rounds", num_rounds, minimum=1)
        self.max_clients = check_opt_int(owner, "max_clients", max_clients, minimum=self.min_clients)
        self.round_timeout = check_opt_float(owner, "round_timeout", round_timeout, gt=0)
        self.evaluate_every = check_int(owner, "evaluate_every", evaluate_every, minimum=0)
        self.time_budget = check_opt_float(owner, "time_budget", time_budget, gt=0)
        self._budget_end: float | None = None
        self._evaluated: int | None = None  # the last version an evaluation was started for
        self._stop_reason = ""
        self._book = TaskBook()
        self._sites: set[str] = set()
        self._phase: Phase = "new"
        self._version = 0
        self._global: dict[str, torch.Tensor] = {}
        self._deadline: float | None = None
        self._final_eval = False
        self._totals = {"accepted": 0, "rejected": 0, "failed_tasks": 0, "evaluated": 0}
        self._reset_round()

    def _reset_round(self) -> None:
        self._acc: dict[str, torch.Tensor] = {}
        self._acc_type: ParamsType | None = None
        self._weight = 0.0
        self._metrics = MetricMean()
        self._new_phase_counts(dispatched=0)

    def _new_phase_counts(self, dispatched: int) -> None:
        self._round = {"dispatched": dispatched, "accepted": 0, "rejected": 0, "failed": 0, "left": 0, "retried": 0}
        self._lost: dict[str, str] = {}  # site -> "left" | "failed": its task of this phase, owed again on return
        self._retried: set[str] = set()  # had it again already (once per round)

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
        if self._budget_end is not None and self._phase in ("train", "waiting"):
            return self._budget_end if self._deadline is None else min(self._deadline, self._budget_end)
        return self._deadline

    def start(self, model: Params, sites: Sequence[str], now: float, *, version: int = 0) -> list[Action]:
        if self._phase != "new":
            raise StrategyError(f"{type(self).__name__}.start() called twice")
        if isinstance(sites, str):
            raise StrategyError("sites must be a sequence of site names, not one string")
        self._global = copy_model(model)
        self._version = check_int(type(self).__name__, "version", version, minimum=0)
        self._sites = set(sites)
        self._budget_end = None if self.time_budget is None else now + self.time_budget
        if self._version >= self.num_rounds:
            return self._end(Finished(f"version {self._version} already reached num_rounds={self.num_rounds}"))
        return self._begin_round(now)

    def site_joined(self, site: str, now: float) -> list[Action]:
        acts = self._events_start(now)
        if self._phase == "done" or site in self._sites:
            return acts
        self._sites.add(site)
        if self._phase == "waiting":
            acts += self._begin_round(now)
        elif site in self._lost and self._phase in ("train", "evaluate"):
            self._round[self._lost.pop(site)] -= 1  # back: its task is pending again, not lost
            self._retried.add(site)
            self._round["retried"] += 1
            acts.append(self._book.issue(site, self._version, "train" if self._phase == "train" else "evaluate"))
        return acts

    def site_left(self, site: str, now: float) -> list[Action]:
        acts = self._events_start(now)
        self._sites.discard(site)
        task = self._book.close_site(site, f"site {site!r} left before answering")
        if task is not None:
            self._round["left"] += 1
            if site not in self._retried:
                self._lost[site] = "left"
            acts += self._close_if_complete(now)
        return acts

    def task_failed(self, site: str, task_id: str, reason: str, now: float, *, blame: bool = True) -> list[Action]:
        acts = self._events_start(now)
        task = self._book.pending_for(site)
        if task is None or task.task_id != task_id:
            return acts  # not pending (already answered, closed, or never ours): nothing changes
        self._book.close(task_id, f"task {task_id} had already failed: {reason}")
        self._round["failed"] += 1
        if site not in self._retried:
            self._lost[site] = "failed"
        self._totals["failed_tasks"] += 1
        return acts + self._close_if_complete(now)

    def on_update(self, update: Update, now: float) -> list[Action]:
        acts = self._events_start(now)
        if self._phase == "done":
            return [*acts, self._reject(update, "the job has ended")]
        claimed = self._book.claim(update)
        if isinstance(claimed, str):
            return [*acts, self._reject(update, claimed)]
        task = claimed
        if task.kind == "evaluate":
            self._totals["evaluated"] += 1
            acts.append(Evaluated(task.version, task.site, clean_metrics(update.metrics)))
            return acts + self._close_if_complete(now)
        reason = check_update_fields(update, task.version) or self._check_result(update) or self._fold(update)
        if reason is not None:
            self._round["rejected"] += 1
            acts.append(self._reject(update, reason))
        else:
            acts.append(Accepted(task.task_id, task.site, task.version, 0, float(update.weight)))
        return acts + self._close_if_complete(now)

    def tick(self, now: float) -> list[Action]:
        return self._events_start(now)

    def state(self) -> dict[str, object]:
        """Job-wide totals plus ``round_*`` counters for the round (or evaluation) in progress."""
        return {
            "strategy": self.name,
            "phase": self._phase,
            "version": self._version,
            "round": self._version + 1,
            "num_rounds": self.num_rounds,
            "sites": len(self._sites),
            "outstanding": len(self._book),
            **self._totals,
            **{f"round_{k}": v for k, v in self._round.items()},
        }

    # ---- phases --------------------------------------------------------------------------------------

    def _events_start(self, now: float) -> list[Action]:
        """Every event first fires a due deadline, so results are judged against the right round."""
        if self._phase == "new":
            raise StrategyError(f"{type(self).__name__}: call start() before any other event")
        if self._phase in ("train", "waiting") and self._budget_spent(now):
            return self._stop_training(now)
        if self._deadline is not None and now >= self._deadline:
            return self._close_phase(now, timed_out=True)
        return []

    def _begin_round(self, now: float) -> list[Action]:
        self._reset_round()
        available = sorted(self._sites)
        if len(available) < self.min_clients:
            self._phase, self._deadline = "waiting", None
            return []
        if self.max_clients is not None and len(available) > self.max_clients:
            offset = (self._version * self.max_clients) % len(available)
            available = sorted((available[offset:] + available[:offset])[: self.max_clients])
        self._phase = "train"
        self._deadline = None if self.round_timeout is None else now + self.round_timeout
        self._round["dispatched"] = len(available)
        return [self._book.issue(site, self._version, "train") for site in available]

    def _budget_spent(self, now: float) -> bool:
        return self._budget_end is not None and now >= self._budget_end

    def _stop_training(self, now: float) -> list[Action]:
        """The time budget ran out inside a round (or while waiting for sites): drop the round, stop."""
        self._stop_reason = f"time budget of {self.time_budget:g} s spent at version {self._version}"
        acts = self._cancel_pending(f"training stopped: {self._stop_reason}")
        self._reset_round()
        if self.evaluate_every and self._evaluated != self._version:
            return acts + self._begin_eval(now, final=True)
        return acts + self._end(Finished(self._stop_reason))

    def _begin_eval(self, now: float, final: bool) -> list[Action]:
        self._evaluated = self._version
        self._phase, self._final_eval = "evaluate", final
        self._deadline = None if self.round_timeout is None else now + self.round_timeout
        self._new_phase_counts(dispatched=len(self._sites))
        acts: list[Action] = [self._book.issue(s, self._version, "evaluate") for s in sorted(self._sites)]
        return acts + self._close_if_complete(now)

    def _close_if_complete(self, now: float) -> list[Action]:
        if self._phase in ("train", "evaluate") and len(self._book) == 0:
            return self._close_phase(now, timed_out=False)
        return []

    def _close_phase(self, now: float, timed_out: bool) -> list[Action]:
        self._deadline = None
        if self._phase == "evaluate":
            return self._close_eval(now)
        return self._close_round(now, timed_out)

    def _close_round(self, now: float, timed_out: bool) -> list[Action]:
        r, n = self._version + 1, self._round["accepted"]
        if n < self.min_clients:
            if timed_out:
                why = f"before the {self.round_timeout:g} s round timeout"
            else:
                c = self._round
                why = (
                    f"after all {c['dispatched']} dispatched tasks ended "
                    f"({c['rejected']} rejected, {c['failed']} failed, {c['left']} sites left)"
                )
            return self._end(Failed(f"round {r}: {n} of min_clients={self.min_clients} results {why}"))
        return self._publish_round(now, timed_out)

    def _publish_round(self, now: float, timed_out: bool) -> list[Action]:
        """The round has its results: the next global version is published, then the next round or evaluation
        starts (secure aggregation first unmasks the sum: ``fedbus.strategy.secure_fedavg``)."""
        r, n = self._version + 1, self._round["accepted"]
        try:
            new_global = self._finish_aggregate()
        except StrategyError as exc:
            return self._end(Failed(f"round {r}: {exc}"))
        acts = self._cancel_pending(f"round {r} closed with {n} results")
        metrics = {
            **self._metrics.result(),
            "strategy/num_updates": float(n),
            "strategy/total_weight": self._weight,
            "strategy/rejected": float(self._round["rejected"]),
            "strategy/timed_out": float(timed_out),
        }
        self._global = new_global
        self._version += 1
        acts.append(Publish(self._version, self._global, metrics))
        last = self._version >= self.num_rounds
        final = last or self._budget_spent(now)
        if last:
            self._stop_reason = f"num_rounds={self.num_rounds} reached (version {self._version})"
        elif final:
            self._stop_reason = f"time budget of {self.time_budget:g} s spent at version {self._version}"
        if self.evaluate_every and (final or self._version % self.evaluate_every == 0):
            return acts + self._begin_eval(now, final=final)
        if final:
            return acts + self._end(Finished(self._stop_reason))
        return acts + self._begin_round(now)

    def _close_eval(self, now: float) -> list[Action]:
        dispatched, missing = self._round["dispatched"], len(self._book)
        acts = self._cancel_pending(f"evaluation of version {self._version} closed")
        if self._final_eval:
            got = dispatched - missing - self._round["failed"] - self._round["left"]
            reason = f"{self._stop_reason}; final evaluation: {got} of {dispatched} sites reported"
            return acts + self._end(Finished(reason))
        if self._budget_spent(now):  # the budget ran out during an evaluation: that version is the last
            reason = f"time budget of {self.time_budget:g} s spent at version {self._version}"
            return acts + self._end(Finished(reason))
        return acts + self._begin_round(now)

    def _end(self, action: Finished | Failed) -> list[Action]:
        acts = self._cancel_pending(f"job ended: {action.reason}")
        self._phase, self._deadline = "done", None
        return [*acts, action]

    def _cancel_pending(self, why: str) -> list[Action]:
        acts: list[Action] = []
        for task in self._book.pending():
            late = f"stale: task {task.task_id} for version {task.version} arrived after {why}"
            self._book.close(task.task_id, late)
            acts.append(Cancel(task.site, task.task_id, why))
        return acts

    # ---- arithmetic ----------------------------------------------------------------------------------

    def _reject(self, update: Update, reason: str) -> Rejected:
        self._totals["rejected"] += 1
        return Rejected(update.task_id, update.site, reason)

    def _check_result(self, update: Update) -> str | None:
        """Why a training result's params cannot be taken (its scalar fields are already checked), or None:
        there must be params, and :meth:`validate_input` must pass them against :meth:`input_reference`."""
        if update.params is None:
            return "a training result must carry params"
        return self.validate_input(self.input_reference(), update.params)

    def _fold(self, update: Update) -> str | None:
        """Count one validated update and fold it into the round's aggregate (``_accumulate``); the reason it could
        not be folded after all (nothing of it was), or None."""
        w = float(update.weight)
        reason = self._accumulate(update, w)
        if reason is not None:
            return reason
        self._weight += w
        self._round["accepted"] += 1
        self._totals["accepted"] += 1
        self._metrics.add(clean_metrics(update.metrics), w)
        return None

    def _accumulate(self, update: Update, w: float) -> str | None:
        """Add ``w * params`` to the round's single accumulator (see theory of operation). A fold that may find an
        update unusable only while folding it (ciphertexts: ``fedbus.strategy.encrypted``) returns why, having
        folded nothing of it; this one always folds."""
        params = update.params
        assert params is not None
        if self._acc_type is None:
            self._acc_type = update.params_type
        if update.params_type == "FULL":
            weighted_sum_into(self._acc, params, w, integers="max")
            if self._acc_type == "DIFF":
                weighted_sum_into(self._acc, self._global, -w, integers="skip")
        else:
            weighted_sum_into(self._acc, params, w, integers="skip")
            if self._acc_type == "FULL":
                weighted_sum_into(self._acc, self._global, w, integers="skip")
        return None

    @torch.no_grad()
    def _finish_aggregate(self) -> dict[str, torch.Tensor]:
        """The next global model from the round's accumulator: the weighted mean, in the global's space."""
        mean = finalize_mean(self._acc, self._weight)
        out: dict[str, torch.Tensor] = {}
        for name, g in self._global.items():
            m = mean.get(name)
            if m is None:  # a non-floating tensor no FULL update supplied
                out[name] = g
            elif not (g.is_floating_point() or g.is_complex()) or self._acc_type == "FULL":
                out[name] = m
            else:
                out[name] = m.add_(g)  # DIFF: global + mean delta (addition commutes exactly)
        self._acc = {}
        return out
