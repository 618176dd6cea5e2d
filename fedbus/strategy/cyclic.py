"""Cyclic (FLARE's CyclicController): the model is relayed through the sites, one after another.

Theory of operation
-------------------
Phases: ``new`` -> ``waiting`` | ``relay`` -> ``done``.

* A round starts once ``min_clients`` sites are available (until then: ``waiting``). Its order is the sorted
  available sites (``order = "fixed"``) or the same shuffled by ``random.Random(seed * 1_000_003 + round)``
  (``order = "random"``: reproducible, different each round).
* The relay: the current global version goes to the first site of the order as a ``train`` task; its result
  becomes the next global version at once, and that version goes to the next site, and so on. **One version
  is published per site visit**, so ``num_rounds`` rounds over N sites publish up to ``num_rounds * N``
  versions, and every checkpoint is the model exactly as one site handed it on.
* A result is FULL (the site's model is taken as it is) or DIFF (added to the model the site was given;
  integer tensors are left alone). Either is checked like FedAvg's (names, dtypes, shapes, NaN/Inf).
* A site that fails its task, sends a refused result, leaves, or is not done by ``task_timeout`` (its task
  gets :class:`Cancel`) is skipped: the model, unchanged, goes to the next site of the order. A site that is
  gone when its turn comes is skipped too; one that joins mid-round waits for the next round.
* A round that ends with no accepted visit (every site was skipped) fails the job: the model went nowhere.
  After ``num_rounds`` rounds the job is :class:`Finished`.
* Resuming from checkpoint version v with N sites given to ``start``: the relay goes on at round ``v // N``,
  position ``v % N`` of that round's order (exact when no visit was skipped before the restart).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from types import MappingProxyType
from typing import Literal

import torch

from fedbus.errors import StrategyError
from fedbus.strategy._config import check_choice, check_int, check_opt_float
from fedbus.strategy._tasks import TaskBook
from fedbus.strategy.base import (
    Accepted,
    Action,
    Cancel,
    Failed,
    Finished,
    Params,
    Publish,
    Rejected,
    Strategy,
    Update,
    check_update_fields,
    clean_metrics,
    copy_model,
)

Phase = Literal["new", "waiting", "relay", "done"]
_OWNER = "Cyclic"


class Cyclic(Strategy):
    """The model visits the sites in turn; see the module docstring for the theory of operation."""

    def __init__(
        self,
        num_rounds: int,
        min_clients: int = 1,
        order: Literal["fixed", "random"] = "fixed",
        seed: int = 0,
        task_timeout: float | None = None,
    ) -> None:
        self.num_rounds = check_int(_OWNER, "num_rounds", num_rounds, minimum=1)
        self.min_clients = check_int(_OWNER, "min_clients", min_clients, minimum=1)
        self.order = check_choice(_OWNER, "order", order, ["fixed", "random"])
        self.seed = check_int(_OWNER, "seed", seed, minimum=0)
        self.task_timeout = check_opt_float(_OWNER, "task_timeout", task_timeout, gt=0)
        self._book = TaskBook()
        self._sites: set[str] = set()
        self._phase: Phase = "new"
        self._version = 0
        self._global: dict[str, torch.Tensor] = {}
        self._deadline: float | None = None
        self._round = 0  # 0-based round in progress
        self._order: list[str] = []
        self._pos = 0  # index in _order of the next site to visit
        self._resume_pos = 0
        self._round_accepted = 0
        self._totals = {"accepted": 0, "rejected": 0, "skipped": 0}

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
        return self._deadline

    def start(self, model: Params, sites: Sequence[str], now: float, *, version: int = 0) -> list[Action]:
        if self._phase != "new":
            raise StrategyError("Cyclic.start() called twice")
        if isinstance(sites, str):
            raise StrategyError("sites must be a sequence of site names, not one string")
        self._global = copy_model(model)
        self._version = check_int(_OWNER, "version", version, minimum=0)
        self._sites = set(sites)
        n = max(len(self._sites), 1)
        self._round, self._resume_pos = divmod(self._version, n)
        if self._round >= self.num_rounds:
            return self._end(Finished(f"version {self._version} already completed num_rounds={self.num_rounds}"))
        return self._begin_round(now)

    def site_joined(self, site: str, now: float) -> list[Action]:
        acts = self._events_start(now)
        if self._phase == "done" or site in self._sites:
            return acts
        self._sites.add(site)
        if self._phase == "waiting":
            acts += self._begin_round(now)
        return acts

    def site_left(self, site: str, now: float) -> list[Action]:
        acts = self._events_start(now)
        self._sites.discard(site)
        if self._book.close_site(site, f"site {site!r} left before answering") is not None:
            acts += self._skip(now)
        return acts

    def task_failed(self, site: str, task_id: str, reason: str, now: float, *, blame: bool = True) -> list[Action]:
        acts = self._events_start(now)
        task = self._book.pending_for(site)
        if task is None or task.task_id != task_id:
            return acts
        self._book.close(task_id, f"task {task_id} had already failed: {reason}")
        return acts + self._skip(now)

    def on_update(self, update: Update, now: float) -> list[Action]:
        acts = self._events_start(now)
        if self._phase == "done":
            return [*acts, self._reject(update, "the job has ended")]
        claimed = self._book.claim(update)
        if isinstance(claimed, str):
            return [*acts, self._reject(update, claimed)]
        reason = check_update_fields(update, claimed.version)
        if reason is None and update.params is None:
            reason = "a training result must carry params"
        if reason is None:
            reason = self.validate_input(self.input_reference(), update.params)  # type: ignore[arg-type]
        if reason is not None:
            return [*acts, self._reject(update, reason), *self._skip(now)]
        self._deadline = None
        self._global = self._apply(update)
        self._version += 1
        self._round_accepted += 1
        self._totals["accepted"] += 1
        metrics = {
            **clean_metrics(update.metrics),
            "strategy/round": float(self._round + 1),
            "strategy/position": float(self._pos),
        }
        acts += [
            Accepted(claimed.task_id, claimed.site, claimed.version, 0, float(update.weight)),
            Publish(self._version, self._global, metrics),
        ]
        return acts + self._next_visit(now)

    def tick(self, now: float) -> list[Action]:
        return self._events_start(now)

    def state(self) -> dict[str, object]:
        return {
            "strategy": "cyclic",
            "phase": self._phase,
            "version": self._version,
            "round": self._round + 1,
            "num_rounds": self.num_rounds,
            "position": self._pos,
            "order": list(self._order),
            "sites": len(self._sites),
            "outstanding": len(self._book),
            **self._totals,
        }

    # ---- the relay -----------------------------------------------------------------------------------

    def _events_start(self, now: float) -> list[Action]:
        if self._phase == "new":
            raise StrategyError("Cyclic: call start() before any other event")
        if self._deadline is not None and now >= self._deadline:
            acts: list[Action] = []
            for task in self._book.pending():
                why = f"no result within task_timeout={self.task_timeout:g} s"
                self._book.close(task.task_id, f"stale: task {task.task_id} arrived after {why}")
                acts.append(Cancel(task.site, task.task_id, why))
            return acts + self._skip(now)
        return []

    def _begin_round(self, now: float) -> list[Action]:
        available = sorted(self._sites)
        if len(available) < self.min_clients:
            self._phase, self._deadline = "waiting", None
            return []
        if self.order == "random":
            random.Random(self.seed * 1_000_003 + self._round).shuffle(available)
        self._phase = "relay"
        self._order, self._pos, self._resume_pos = available, self._resume_pos, 0
        self._round_accepted = 0
        return self._next_visit(now)

    def _next_visit(self, now: float) -> list[Action]:
        """Dispatch the current version to the next available site of the order, or end the round."""
        while self._pos < len(self._order):
            site = self._order[self._pos]
            self._pos += 1
            if site in self._sites:
                self._deadline = None if self.task_timeout is None else now + self.task_timeout
                return [self._book.issue(site, self._version, "train")]
            self._totals["skipped"] += 1
        self._deadline = None
        return self._end_round(now)

    def _skip(self, now: float) -> list[Action]:
        self._totals["skipped"] += 1
        self._deadline = None
        return self._next_visit(now)

    def _end_round(self, now: float) -> list[Action]:
        r = self._round + 1
        if self._round_accepted == 0 and self._order:
            return self._end(Failed(f"round {r}: none of the {len(self._order)} sites returned a model"))
        self._round += 1
        if self._round >= self.num_rounds:
            return self._end(Finished(f"num_rounds={self.num_rounds} reached (version {self._version})"))
        return self._begin_round(now)

    def _end(self, action: Finished | Failed) -> list[Action]:
        self._phase, self._deadline = "done", None
        return [action]

    @torch.no_grad()
    def _apply(self, update: Update) -> dict[str, torch.Tensor]:
        params = update.params
        assert params is not None
        if update.params_type == "FULL":
            return {name: params[name].detach().clone() for name in self._global}
        out: dict[str, torch.Tensor] = {}
        for name, g in self._global.items():
            out[name] = g + params[name] if (g.is_floating_point() or g.is_complex()) else g
        return out

    def _reject(self, update: Update, reason: str) -> Rejected:
        self._totals["rejected"] += 1
        return Rejected(update.task_id, update.site, reason)
