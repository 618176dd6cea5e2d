"""FedEval: evaluation only. Every site evaluates the start model once; nothing is trained or published.

Phases: ``new`` -> ``waiting`` | ``evaluate`` -> ``done``.

* Evaluation starts as soon as ``min_clients`` sites are available (``start`` or ``site_joined``; until then the
  phase is ``waiting``): each available site gets an ``evaluate`` task of the start version. A site that joins
  during the evaluation gets one too, and so does a site that comes back after its task was lost (it left, or
  the task failed), once: every site of the job is asked, and a broken script is not retried in a loop.
* Each answer becomes :class:`Evaluated` (its finite metrics; params, if any, are ignored).
* The job ends when no task is pending, or at ``eval_timeout`` (pending tasks get :class:`Cancel`): with at
  least ``min_clients`` reports it is :class:`Finished`, else :class:`Failed`, naming the counts.
* The model is never changed and no :class:`Publish` is returned: ``version`` stays the start version.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType
from typing import Literal

import torch

from fedbus.errors import StrategyError
from fedbus.strategy._config import check_int, check_opt_float
from fedbus.strategy._tasks import TaskBook
from fedbus.strategy.base import (
    Action,
    Cancel,
    Evaluated,
    Failed,
    Finished,
    Params,
    Rejected,
    Strategy,
    Update,
    clean_metrics,
    copy_model,
)

Phase = Literal["new", "waiting", "evaluate", "done"]


class FedEval(Strategy):
    """Dispatch the start model for evaluation to every site and collect the metrics; see the module docstring."""

    def __init__(self, min_clients: int = 1, eval_timeout: float | None = None) -> None:
        self.min_clients = check_int("FedEval", "min_clients", min_clients, minimum=1)
        self.eval_timeout = check_opt_float("FedEval", "eval_timeout", eval_timeout, gt=0)
        self._book = TaskBook()
        self._sites: set[str] = set()
        self._asked: dict[str, int] = {}  # site -> tasks it was given (at most 2: a retry after a loss)
        self._reported: set[str] = set()
        self._phase: Phase = "new"
        self._version = 0
        self._model: dict[str, torch.Tensor] = {}
        self._deadline: float | None = None
        self._counts = {"dispatched": 0, "reported": 0, "failed": 0, "left": 0, "rejected": 0}

    @property
    def version(self) -> int:
        return self._version

    @property
    def model(self) -> Params:
        return MappingProxyType(self._model)

    @property
    def done(self) -> bool:
        return self._phase == "done"

    @property
    def next_deadline(self) -> float | None:
        return self._deadline

    def start(self, model: Params, sites: Sequence[str], now: float, *, version: int = 0) -> list[Action]:
        if self._phase != "new":
            raise StrategyError("FedEval.start() called twice")
        if isinstance(sites, str):
            raise StrategyError("sites must be a sequence of site names, not one string")
        self._model = copy_model(model)
        self._version = check_int("FedEval", "version", version, minimum=0)
        self._sites = set(sites)
        self._phase = "waiting"
        return self._maybe_begin(now)

    def site_joined(self, site: str, now: float) -> list[Action]:
        acts = self._events_start(now)
        if self._phase == "done":
            return acts
        self._sites.add(site)
        if self._phase == "waiting":
            return acts + self._maybe_begin(now)
        if site not in self._reported and not self._book.is_busy(site) and self._asked.get(site, 0) < 2:
            acts.append(self._ask(site))
        return acts

    def site_left(self, site: str, now: float) -> list[Action]:
        acts = self._events_start(now)
        self._sites.discard(site)
        if self._book.close_site(site, f"site {site!r} left before answering") is not None:
            self._counts["left"] += 1
            acts += self._close_if_complete()
        return acts

    def task_failed(self, site: str, task_id: str, reason: str, now: float, *, blame: bool = True) -> list[Action]:
        acts = self._events_start(now)
        task = self._book.pending_for(site)
        if task is None or task.task_id != task_id:
            return acts
        self._book.close(task_id, f"task {task_id} had already failed: {reason}")
        self._counts["failed"] += 1
        return acts + self._close_if_complete()

    def on_update(self, update: Update, now: float) -> list[Action]:
        acts = self._events_start(now)
        if self._phase == "done":
            return [*acts, self._reject(update, "the job has ended")]
        claimed = self._book.claim(update)
        if isinstance(claimed, str):
            return [*acts, self._reject(update, claimed)]
        self._reported.add(claimed.site)
        self._counts["reported"] += 1
        acts.append(Evaluated(claimed.version, claimed.site, clean_metrics(update.metrics)))
        return acts + self._close_if_complete()

    def tick(self, now: float) -> list[Action]:
        return self._events_start(now)

    def state(self) -> dict[str, object]:
        return {
            "strategy": "fedeval",
            "phase": self._phase,
            "version": self._version,
            "sites": len(self._sites),
            "outstanding": len(self._book),
            **self._counts,
        }

    # ---- internals ---------------------------------------------------------------------------------------

    def _events_start(self, now: float) -> list[Action]:
        if self._phase == "new":
            raise StrategyError("FedEval: call start() before any other event")
        if self._deadline is not None and now >= self._deadline:
            return self._end(timed_out=True)
        return []

    def _maybe_begin(self, now: float) -> list[Action]:
        if len(self._sites) < self.min_clients:
            return []
        self._phase = "evaluate"
        self._deadline = None if self.eval_timeout is None else now + self.eval_timeout
        return [self._ask(site) for site in sorted(self._sites)]

    def _ask(self, site: str) -> Action:
        self._asked[site] = self._asked.get(site, 0) + 1
        self._counts["dispatched"] += 1
        return self._book.issue(site, self._version, "evaluate")

    def _close_if_complete(self) -> list[Action]:
        if self._phase == "evaluate" and len(self._book) == 0:
            return self._end(timed_out=False)
        return []

    def _end(self, timed_out: bool) -> list[Action]:
        why = "evaluation timed out" if timed_out else "evaluation done"
        acts: list[Action] = []
        for task in self._book.pending():
            self._book.close(task.task_id, f"stale: task {task.task_id} arrived after the {why}")
            acts.append(Cancel(task.site, task.task_id, why))
        self._phase, self._deadline = "done", None
        n = len(self._reported)
        summary = f"{why}: {n} of {len(self._asked)} sites reported on version {self._version}"
        if n < self.min_clients:
            return [*acts, Failed(f"{summary}, fewer than min_clients={self.min_clients}")]
        return [*acts, Finished(summary)]

    def _reject(self, update: Update, reason: str) -> Rejected:
        self._counts["rejected"] += 1
        return Rejected(update.task_id, update.site, reason)
