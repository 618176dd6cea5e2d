"""Task bookkeeping shared by the strategies: which task went where, and what an answer to it means.

Every result names a task id; the book turns it into either the pending task (exactly once) or a reason
to refuse it: never issued ("unknown task"), answered already ("duplicate"), or closed for another
reason (round over, site left, task failed: the closer wrote the reason). That is how a result is never
counted twice and a straggler never lands in the wrong round.

Task ids are ``f"{version}-{site}-{n}"`` with ``n`` counting every task this book issued, so they are
unique within one strategy instance and identical across reproducible runs. Closed tasks are
remembered for the last ``history`` tasks only, so a year-long FedBuff job holds bounded memory; an
answer to a task older than that is refused as unknown.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from fedbus.errors import StrategyError
from fedbus.strategy.base import Dispatch, TaskKind, Update

ANSWERED = "answered"


@dataclass
class Task:
    """One dispatched task; ``closed`` is None while it is pending, else the reason for a late answer."""

    task_id: str
    site: str
    version: int
    kind: TaskKind
    closed: str | None = None


class TaskBook:
    """Pending tasks (at most one per site) and a bounded memory of closed ones."""

    def __init__(self, history: int = 10_000) -> None:
        self._history = history
        self._count = 0
        self._pending: dict[str, Task] = {}  # task_id -> task, in issue order
        self._by_site: dict[str, Task] = {}
        self._closed: OrderedDict[str, Task] = OrderedDict()
        self._freed: set[str] = set()  # sites whose task closed since take_freed() was last called

    def __len__(self) -> int:
        """How many tasks are pending."""
        return len(self._pending)

    @property
    def issued(self) -> int:
        """How many tasks were issued in all."""
        return self._count

    def issue(self, site: str, version: int, kind: TaskKind = "train") -> Dispatch:
        """A new pending task for an idle ``site``, as the Dispatch action announcing it."""
        if site in self._by_site:
            raise StrategyError(f"bug: site {site!r} already has task {self._by_site[site].task_id}")
        task = Task(f"{version}-{site}-{self._count}", site, version, kind)
        self._count += 1
        self._pending[task.task_id] = task
        self._by_site[site] = task
        return Dispatch(site, task.task_id, version, kind)

    def pending(self) -> list[Task]:
        """Pending tasks in issue order."""
        return list(self._pending.values())

    def pending_for(self, site: str) -> Task | None:
        """The task ``site`` is working on, if any."""
        return self._by_site.get(site)

    def take_freed(self) -> set[str]:
        """The sites whose task closed since the last call (each had become idle then): an owner keeps its
        idle sites current from these, in the number of changes, instead of scanning every site."""
        freed, self._freed = self._freed, set()
        return freed

    def is_busy(self, site: str) -> bool:
        """Whether ``site`` has a pending task."""
        return site in self._by_site

    def claim(self, update: Update) -> Task | str:
        """The pending task ``update`` answers (now closed as answered), or why the update is refused.

        A result from the wrong site leaves the task pending: the rightful site may still answer.
        """
        task_id = update.task_id
        task = self._pending.get(task_id) if isinstance(task_id, str) else None
        if task is not None:
            if task.site != update.site:
                return f"task {task_id} was sent to site {task.site!r}, not {update.site!r}"
            self._close(task, ANSWERED)
            return task
        old = self._closed.get(task_id) if isinstance(task_id, str) else None
        if old is None:
            return f"unknown task {task_id!r}"
        if old.site != update.site:
            return f"task {task_id} was sent to site {old.site!r}, not {update.site!r}"
        if old.closed == ANSWERED:
            return f"duplicate result for task {task_id} (already answered)"
        return str(old.closed)

    def close(self, task_id: str, late_reason: str) -> Task | None:
        """Close a pending task without an answer; a later answer is refused with ``late_reason``."""
        task = self._pending.get(task_id)
        if task is not None:
            self._close(task, late_reason)
        return task

    def close_site(self, site: str, late_reason: str) -> Task | None:
        """Close ``site``'s pending task, if any (the site left)."""
        task = self._by_site.get(site)
        if task is not None:
            self._close(task, late_reason)
        return task

    def _close(self, task: Task, reason: str) -> None:
        task.closed = reason
        del self._pending[task.task_id]
        del self._by_site[task.site]
        self._freed.add(task.site)
        self._closed[task.task_id] = task
        while len(self._closed) > self._history:
            self._closed.popitem(last=False)
