"""Accepted updates that outlive the broker process, for strategies that buffer them (``restores_updates``).

Each accepted update's params are kept under the job's ``kept/`` folder (a spooled upload's file is renamed
there; a small in-memory upload is appended to the log of the version it lands in) and its store row says
where, until a recorded checkpoint covers it. A broker restarted from checkpoint v folds the ones that land
after v again (``Strategy.restore``), in the order they were accepted, instead of recording them lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedbus.broker.store import JobStore
from fedbus.errors import FedbusError
from fedbus.log import get_logger
from fedbus.modelio import serde
from fedbus.modelio.spool import SpooledParams, open_params
from fedbus.strategy import Accepted, Action, Rejected, Strategy, Update
from fedbus.strategy.base import clean_metrics

log = get_logger("broker.kept")


def keep_update(store: JobStore, job_id: str, wire: str, update: Update, action: Accepted) -> dict[str, Any] | None:
    """Put an accepted update's params where a restarted broker finds them, synced before its site hears it was
    delivered (``JobStore.sync_soon``); what its store row records. None when there is nothing to keep, or the
    disk refused it: the update is folded all the same (it is in memory, and in the next checkpoint once that is
    written), but a broker killed before that checkpoint records it lost."""
    if update.params is None:
        return None
    params = update.params
    where: dict[str, Any] | None = None
    folder = store.kept_dir(job_id)
    try:
        if isinstance(params, SpooledParams):  # a large upload: its spool file is renamed into kept/
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{wire}.safetensors"
            if params.keep_as(path):
                store.sync_soon(path)
                where = {"path": str(path)}
        if where is None:  # a small upload, received into memory: appended to the log of the version it lands in
            raw = getattr(params, "raw", None)  # the bytes as received: no laying out again
            parts = [memoryview(raw.numpy())] if raw is not None else serde.layout(params).parts
            where = store.keep_small(job_id, action.version + action.staleness + 1, parts)
    except OSError as exc:
        log.error("accepted update not kept on disk", job=job_id, task=wire, path=str(folder), error=str(exc))
        return None
    return {
        **where,
        "params_type": update.params_type,
        "weight": float(update.weight),
        "metrics": clean_metrics(update.metrics),
    }


def restore_kept(
    store: JobStore, job_id: str, strategy: Strategy, max_model_bytes: int, execute: Callable[[Action], None]
) -> tuple[int, int]:
    """Fold again into ``strategy`` the updates kept after its version; other actions go to ``execute``.
    Returns how many were folded again and how many dropped (unreadable, or refused now)."""
    restored = dropped = 0
    for row in store.kept_updates(job_id, strategy.version):
        kept = row["kept"]
        try:
            params = open_params(
                kept["path"], max_total=max_model_bytes, offset=kept.get("offset", 0), length=kept.get("length")
            )
        except (FedbusError, OSError) as exc:
            store.drop_update(
                row["rowid"], f"accepted, but its kept copy could not be read when the broker restarted: {exc}"
            )
            dropped += 1
            continue
        update = Update(
            site=row["site"],
            task_id=row["task_id"],
            base_version=row["version"],
            params=params,
            params_type=kept["params_type"],
            weight=kept["weight"],
            metrics=kept["metrics"],
        )
        try:
            actions = strategy.restore(update)
        finally:
            params.release()
        for action in actions:
            if isinstance(action, Accepted):
                store.refold_update(row["rowid"], action.staleness, action.weight)
                restored += 1
            elif isinstance(action, Rejected):
                store.drop_update(
                    row["rowid"], f"accepted, but not folded again when the broker restarted: {action.reason}"
                )
                dropped += 1
            else:
                execute(action)
    return restored, dropped
