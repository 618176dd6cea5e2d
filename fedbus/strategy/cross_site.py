"""Cross-site evaluation: after a job's strategy finishes, every site scores every model.

Theory of operation
-------------------
:class:`CrossSiteEval` wraps any strategy (``inner``) and adds two phases after it, as NVIDIA FLARE's
cross-site model evaluation does:

* ``inner``: every event goes to ``inner`` and its actions come back unchanged, until it returns
  :class:`Finished` (held back: the job is not over yet). ``Failed`` ends the job as it is: there is no
  trained model worth comparing.
* ``submit``: every site connected at that moment gets a ``submit_model`` task (no model travels with it);
  its answer is the site's local model, FULL params, checked against the global model like any training
  result (names, dtypes, shapes, finite values) and kept (copied: the controller frees uploads after the
  call).
* ``evaluate``: every connected site gets one ``evaluate`` task per model: the final global model, named
  ``global_name`` ("server") and sent as the global version; each submitted site model, named by its
  site; and every extra server model given to the constructor (pre-trained models:
  ``NumpyCrossSiteEvalRecipe``), named by its key. A site holds one task at a time and gets its next model
  when it answers, so a site never stores more than one extra model. Each answer is
  :class:`Evaluated` with ``model_name`` set: the controller records it as one cell of the
  ``{model_name: {site: metrics}}`` matrix.
* ``done``: :class:`Finished`, its reason the inner one's plus how many cells were filled.

Neither phase waits for sites (no ``min_clients``): they use the sites connected when the phase starts. A
site that leaves keeps its place: its unanswered task goes back to the front of its queue and is sent
again if it returns while the phase runs. A task that fails is not retried (a script that cannot evaluate
one model would fail again); its cell stays empty. A phase ends when no task is pending and no connected
site has work queued, or at ``timeout`` seconds after it began (pending tasks get :class:`Cancel`).

Answers to ``inner``'s tasks that arrive later go to ``inner``, which refuses them as its job has ended.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fedbus.errors import ConfigError, StrategyError
from fedbus.protocol.messages import Message
from fedbus.strategy._config import check_opt_float
from fedbus.strategy.base import (
    Action,
    Cancel,
    Dispatch,
    Evaluated,
    Failed,
    Finished,
    Params,
    Rejected,
    Strategy,
    Update,
    clean_metrics,
    copy_model,
    validate_update,
)

Phase = Literal["new", "inner", "submit", "evaluate", "done"]
SUBMIT = ""
"""The queue entry of a ``submit_model`` task (model names are never empty)."""
GLOBAL_NAME = "server"
_HISTORY = 10_000


@dataclass(frozen=True)
class _Task:
    site: str
    kind: Literal["submit_model", "evaluate"]
    model_name: str


class CrossSiteEval(Strategy):
    """``inner``'s training, then cross-site evaluation (see the module docstring).

    ``inner`` None: no training; the phases run at once on the model given to ``start``, which is evaluated
    as ``global_name`` when ``evaluate_global`` (a standalone evaluation of pre-trained models).
    ``server_models``: extra models every site evaluates, by name; they are copied. ``submit_models``
    False skips the submit phase (only the server-side models are evaluated). ``timeout``: seconds each
    phase may last (None: until every task ended).
    """

    def __init__(
        self,
        inner: Strategy | None = None,
        server_models: Mapping[str, Params] | None = None,
        *,
        evaluate_global: bool = True,
        submit_models: bool = True,
        timeout: float | None = None,
        global_name: str = GLOBAL_NAME,
    ) -> None:
        if inner is not None and not isinstance(inner, Strategy):
            raise StrategyError(f"CrossSiteEval wraps a Strategy, got {type(inner).__name__}")
        if not isinstance(global_name, str) or not global_name:
            raise StrategyError(f"CrossSiteEval: global_name must be a non-empty string, got {global_name!r}")
        self._phase: Phase = "new"
        self.inner = inner
        self.timeout = check_opt_float("CrossSiteEval", "timeout", timeout, gt=0)
        self.evaluate_global = bool(evaluate_global)
        self.submit_models = bool(submit_models)
        self.global_name = global_name
        self.server_models: dict[str, dict[str, torch.Tensor]] = {}
        self.add_server_models(server_models or {})
        if inner is not None:  # what the controller reads of a strategy, as the inner one says it
            self.params_type = inner.params_type  # type: ignore[misc]
            self.restores_updates = inner.restores_updates  # type: ignore[misc]
        self._inner_reason = ""
        self._sites: set[str] = set()
        self._global: Mapping[str, torch.Tensor] = {}
        self._version = 0
        self._deadline: float | None = None
        self._now = 0.0  # the latest event's time: ``restore`` has none of its own
        self._count = 0
        self._pending: dict[str, _Task] = {}  # task id -> task
        self._by_site: dict[str, str] = {}  # site -> its pending task id
        self._closed: OrderedDict[str, str] = OrderedDict()  # task id -> why an answer now is refused
        self._queue: dict[str, deque[str]] = {}  # site -> model names still to evaluate (SUBMIT in phase 1)
        self._submitted: dict[str, dict[str, torch.Tensor]] = {}  # site -> its local model
        self._models: dict[str, Params | None] = {}  # phase 2: model name -> tensors (None: the global version)
        self._results: dict[str, dict[str, dict[str, float]]] = {}
        self._counts = {"submitted": 0, "declined": 0, "refused": 0, "failed": 0, "evaluated": 0}

    def add_server_models(self, models: Mapping[str, Params]) -> None:
        """More server-side models to evaluate (before ``start``): the broker loads them from the job folder."""
        if self._phase != "new":
            raise StrategyError("CrossSiteEval: server models must be added before start()")
        for name, params in models.items():
            if not isinstance(name, str) or not name or name == self.global_name:
                raise StrategyError(f"CrossSiteEval: server model name {name!r} is empty or {self.global_name!r}")
            self.server_models[name] = copy_model(params)

    # ---- what the controller reads ------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self.inner.version if self.inner is not None else self._version

    @property
    def model(self) -> Params:
        return self.inner.model if self.inner is not None else self._global

    @property
    def done(self) -> bool:
        return self._phase == "done"

    @property
    def next_deadline(self) -> float | None:
        if self._phase == "inner" and self.inner is not None:
            return self.inner.next_deadline
        return self._deadline

    @property
    def results(self) -> dict[str, dict[str, dict[str, float]]]:
        """The matrix so far: ``{model_name: {site: metrics}}``."""
        return {m: dict(row) for m, row in self._results.items()}

    def client_options(self) -> dict[str, Any]:
        return self.inner.client_options() if self.inner is not None else {}

    def input_spec(self) -> Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None:
        """The inner strategy's inputs while it trains; afterwards results are local models (the global's)."""
        return self.inner.input_spec() if self._phase == "inner" and self.inner is not None else None

    def validate_input(self, reference: Params, params: Params) -> str | None:
        if self._phase == "inner" and self.inner is not None:
            return self.inner.validate_input(reference, params)
        return validate_update(reference, params)

    def restore(self, update: Update) -> list[Action]:
        if self.inner is None:
            return super().restore(update)
        return self._from_inner(self.inner.restore(update), self._now)

    def recount(self, updates: Sequence[Mapping[str, Any]], evaluations: int) -> None:
        if self.inner is not None:
            self.inner.recount(updates, evaluations)

    def state(self) -> dict[str, object]:
        base: dict[str, object] = dict(self.inner.state()) if self.inner is not None else {"strategy": "cross_site"}
        cells = sum(len(row) for row in self._results.values())
        return {
            **base,
            "cross_site_phase": self._phase,
            "cross_site_models": len(self._models),
            "cross_site_pending": len(self._pending),
            "cross_site_cells": cells,
            **{f"cross_site_{k}": v for k, v in self._counts.items()},
        }

    # ---- events ---------------------------------------------------------------------------------------

    def start(self, model: Params, sites: Sequence[str], now: float, *, version: int = 0) -> list[Action]:
        if self._phase != "new":
            raise StrategyError("CrossSiteEval.start() called twice")
        if isinstance(sites, str):
            raise StrategyError("sites must be a sequence of site names, not one string")
        self._sites = set(sites)
        self._now = now
        if self.inner is None:
            self._global = copy_model(model)
            self._version = version
            return self._begin_submit(now)
        self._phase = "inner"
        return self._from_inner(self.inner.start(model, sites, now, version=version), now)

    def on_message(self, site: str, msg: Message, now: float) -> list[Action]:
        """A protocol message for the inner strategy (secure aggregation); none is taken after it finished."""
        acts = self._events_start(now)
        handler = getattr(self.inner, "on_message", None)
        if self._phase != "inner" or handler is None:
            return acts
        return acts + self._from_inner(handler(site, msg, now), now)

    def site_joined(self, site: str, now: float) -> list[Action]:
        acts = self._events_start(now)
        self._sites.add(site)
        if self._phase == "inner" and self.inner is not None:
            return acts + self._from_inner(self.inner.site_joined(site, now), now)
        if self._phase in ("submit", "evaluate"):
            acts += self._next_for(site)
        return acts

    def site_left(self, site: str, now: float) -> list[Action]:
        acts = self._events_start(now)
        self._sites.discard(site)
        if self._phase == "inner" and self.inner is not None:
            return acts + self._from_inner(self.inner.site_left(site, now), now)
        task_id = self._by_site.get(site)
        if task_id is not None and self._phase in ("submit", "evaluate"):
            task = self._close(task_id, f"site {site!r} left before answering task {task_id}")
            self._queue.setdefault(site, deque()).appendleft(SUBMIT if task.kind == "submit_model" else task.model_name)
        return acts + self._close_if_complete(now)

    def on_update(self, update: Update, now: float) -> list[Action]:
        acts = self._events_start(now)
        task = self._pending.get(update.task_id) if isinstance(update.task_id, str) else None
        if task is None:
            if update.task_id in self._closed:
                return [*acts, Rejected(update.task_id, update.site, self._closed[update.task_id])]
            if self.inner is not None:  # one of inner's tasks (refused by it once it has ended)
                return acts + self._from_inner(self.inner.on_update(update, now), now)
            return [*acts, Rejected(update.task_id, update.site, f"unknown task {update.task_id!r}")]
        if task.site != update.site:
            return [
                *acts,
                Rejected(update.task_id, update.site, f"task was sent to {task.site!r}, not {update.site!r}"),
            ]
        self._close(update.task_id, f"duplicate result for task {update.task_id} (already answered)")
        if task.kind == "submit_model":
            if update.params is None:  # the site has no local model to offer (it only evaluates): no row of its own
                self._counts["declined"] += 1
            elif (reason := self._check_submission(update.params_type, update.params)) is not None:
                self._counts["refused"] += 1
                acts.append(Rejected(update.task_id, update.site, f"submitted model refused: {reason}"))
            else:
                self._submitted[update.site] = copy_model(update.params)
                self._counts["submitted"] += 1
        else:
            metrics = clean_metrics(update.metrics)
            self._results.setdefault(task.model_name, {})[update.site] = metrics
            self._counts["evaluated"] += 1
            acts.append(Evaluated(self.version, update.site, metrics, task.model_name))
        acts += self._next_for(update.site)
        return acts + self._close_if_complete(now)

    def task_failed(self, site: str, task_id: str, reason: str, now: float, *, blame: bool = True) -> list[Action]:
        acts = self._events_start(now)
        task = self._pending.get(task_id)
        if task is None:
            if self._phase == "inner" and self.inner is not None:
                return acts + self._from_inner(self.inner.task_failed(site, task_id, reason, now, blame=blame), now)
            if self.inner is not None and task_id not in self._closed:
                return acts + self.inner.task_failed(site, task_id, reason, now, blame=blame)
            return acts
        if task.site != site:
            return acts
        self._close(task_id, f"task {task_id} had already failed: {reason}")
        self._counts["failed"] += 1
        return acts + self._next_for(site) + self._close_if_complete(now)

    def tick(self, now: float) -> list[Action]:
        acts = self._events_start(now)
        if self._phase == "inner" and self.inner is not None:
            acts += self._from_inner(self.inner.tick(now), now)
        return acts

    # ---- phases ---------------------------------------------------------------------------------------

    def _events_start(self, now: float) -> list[Action]:
        if self._phase == "new":
            raise StrategyError("CrossSiteEval: call start() before any other event")
        self._now = now
        if self._phase in ("submit", "evaluate") and self._deadline is not None and now >= self._deadline:
            return self._close_phase(now, timed_out=True)
        return []

    def _from_inner(self, actions: list[Action], now: float) -> list[Action]:
        """Inner's actions, with its Finished replaced by the start of cross-site evaluation."""
        out: list[Action] = []
        for action in actions:
            if isinstance(action, Finished) and self._phase == "inner":
                self._inner_reason = action.reason
                out += self._begin_submit(now)
            elif isinstance(action, Failed) and self._phase == "inner":
                self._phase = "done"
                out.append(action)
            else:
                out.append(action)
        return out

    def _begin_submit(self, now: float) -> list[Action]:
        if not self.submit_models:
            return self._begin_evaluate(now)
        self._phase = "submit"
        return self._begin_phase({site: [SUBMIT] for site in self._sites}, now)

    def _begin_evaluate(self, now: float) -> list[Action]:
        self._phase = "evaluate"
        self._models = {}
        if self.evaluate_global:
            self._models[self.global_name] = None  # the global version: the controller streams it as it is
        for site in sorted(self._submitted):
            self._models[site if site not in self.server_models and site != self.global_name else f"site:{site}"] = (
                self._submitted[site]
            )
        self._models.update(self.server_models)
        return self._begin_phase({site: list(self._models) for site in self._sites}, now)

    def _begin_phase(self, work: Mapping[str, list[str]], now: float) -> list[Action]:
        self._queue = {site: deque(names) for site, names in work.items() if names}
        self._deadline = None if self.timeout is None else now + self.timeout
        acts: list[Action] = []
        for site in sorted(self._queue):
            acts += self._next_for(site)
        return acts + self._close_if_complete(now)

    def _next_for(self, site: str) -> list[Action]:
        """The next task of ``site``'s queue, if it is connected and idle."""
        queue = self._queue.get(site)
        if not queue or site not in self._sites or site in self._by_site:
            return []
        name = queue.popleft()
        task_id = f"xsite-{self._count}-{site}"
        self._count += 1
        if name == SUBMIT:
            task = _Task(site, "submit_model", "")
            dispatch = Dispatch(site, task_id, self.version, "submit_model")
        else:
            task = _Task(site, "evaluate", name)
            dispatch = Dispatch(site, task_id, self.version, "evaluate", self._models[name], name)
        self._pending[task_id] = task
        self._by_site[site] = task_id
        return [dispatch]

    def _close(self, task_id: str, late_reason: str) -> _Task:
        task = self._pending.pop(task_id)
        del self._by_site[task.site]
        self._closed[task_id] = late_reason
        while len(self._closed) > _HISTORY:
            self._closed.popitem(last=False)
        return task

    def _close_if_complete(self, now: float) -> list[Action]:
        if self._phase not in ("submit", "evaluate") or self._pending:
            return []
        if any(self._queue.get(site) for site in self._sites):
            return []
        return self._close_phase(now, timed_out=False)

    def _close_phase(self, now: float, *, timed_out: bool) -> list[Action]:
        acts: list[Action] = []
        why = f"the cross-site {self._phase} phase timed out after {self.timeout:g} s" if timed_out else "phase over"
        for task_id, task in list(self._pending.items()):
            self._close(task_id, f"stale: task {task_id} answered after {why}")
            acts.append(Cancel(task.site, task_id, why))
        self._deadline = None
        if self._phase == "submit":
            return acts + self._begin_evaluate(now)
        self._phase = "done"
        self._models = {}
        self._submitted = {}
        cells = sum(len(row) for row in self._results.values())
        summary = f"cross-site evaluation: {cells} results for {len(self._results)} models"
        reason = f"{self._inner_reason}; {summary}" if self._inner_reason else summary
        return [*acts, Finished(reason + (" (timed out)" if timed_out else ""))]

    def _check_submission(self, params_type: str, params: Params) -> str | None:
        if params_type != "FULL":
            return f"a submitted model must be FULL params, got {params_type!r}"
        return validate_update(self.model, params)


class StandaloneCrossSiteEval(CrossSiteEval):
    """Cross-site evaluation with no training before it, registered as ``cross_site_eval``: the job's model is
    evaluated as ``server`` (unless ``evaluate_global`` is false), with every site's local model (unless
    ``submit_models`` is false) and the server models the job folder carries (the broker loads them)."""

    def __init__(self, evaluate_global: bool = True, submit_models: bool = True, timeout: float | None = None) -> None:
        for name, value in (("evaluate_global", evaluate_global), ("submit_models", submit_models)):
            if not isinstance(value, bool):
                raise ConfigError(f"cross_site_eval: {name} must be true or false, got {value!r}")
        super().__init__(None, evaluate_global=evaluate_global, submit_models=submit_models, timeout=timeout)
