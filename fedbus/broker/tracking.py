"""Per-job experiment tracking at the broker: sites' records, their scripts' output, the best global model.

What arrives (on the event loop, from ``Broker._job_event`` and the job's controller through ``Metrics``):

* ``log`` records from sites (``flare.log`` and ``fedbus.client.tracking``'s writers): checked by
  ``check_record`` (string keys of at most 256 characters, finite numbers, bounded sizes), then written to the
  stores the job's ``[tracking] types`` names (``tracking_stores``). No types: nothing is written here (the
  broker's store keeps its record of every ``log`` event either way).
* ``log_text`` lines, the script's output a site relays when the job says ``[client] log_streaming``: appended
  to ``<job>/logs/<site>.log`` (the folder made when the first line arrives).
* every published global version and its metrics: with ``[tracking] key_metric``, the best global model so far
  (highest metric of that name) is written to ``<job>/best_model.safetensors``. Which version a metric speaks
  for: sites report the metric of the global model they received, evaluated before training (FLARE's convention,
  e.g. hello-pt's ``accuracy``), so the metrics published with version v (means over updates trained from
  version v-1) rate version v-1. The initial model (version 0) is never chosen, as FLARE's model selector
  skips round 0.

Why a thread per job: file writes (and MLflow/W&B, which write many small files) never hold the event loop.
Each job's items go through a bounded queue to its thread; a full queue drops the item and counts it (the
count is logged when the job's sink closes). The job's end flushes and closes its stores; the thread lingers
a little for the lines that trail the end (a site's last output comes after its script has exited), then
ends; a later item starts a new sink, which picks up the same files, runs and best metric.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from fedbus.broker.metrics import BoardWriters
from fedbus.broker.tracking_stores import TYPES, Store, open_store
from fedbus.errors import RemoteProtocolError as BadRecord  # a site's record that breaks the rules
from fedbus.log import get_logger
from fedbus.modelio import serde

log = get_logger("broker.tracking")

QUEUE_MAX = 10_000
"""Items a job's sink holds before it drops new ones."""
LINGER_S = 30.0
"""How long a job's sink waits, after the job's end, for items that trail it before its thread ends."""
MAX_KEY = 256
MAX_ENTRIES = 256
"""Entries of a dict-valued record (``add_scalars``, ``log_metrics``, ``log_params``)."""
MAX_TEXT = 64 * 1024
MAX_LOG_BATCH = 64 * 1024
"""Bytes of output lines one ``log_text`` event may carry (a site batches below this)."""
KINDS = ("scalar", "scalars", "metric", "metrics", "param", "params", "text")
WRITERS = ("tensorboard", "mlflow", "wandb")
BEST_MODEL = "best_model.safetensors"


@dataclass(frozen=True)
class Record:
    """One checked tracking record of a site."""

    key: str
    value: float | str | dict[str, Any]
    step: int | None
    kind: str
    writer: str


def _finite(value: object) -> TypeGuard[float]:
    """A finite int or float (not a bool): a metric that can rate a version."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_key(key: Any, what: str) -> str:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY:
        raise BadRecord(f"log record: {what} must be a string of 1 to {MAX_KEY} characters, got {str(key)[:80]!r}")
    return key


def _check_param(value: Any, what: str) -> Any:
    if isinstance(value, bool) or _finite(value) or (isinstance(value, str) and len(value) <= MAX_TEXT):
        return value
    raise BadRecord(f"log record: {what} must be a finite number, a bool or a short string")


def check_record(data: Mapping[str, Any]) -> Record:
    """A ``log`` event's data checked: ``{key, value, step}`` (``flare.log``) or with ``kind`` and ``writer``.

    Raises BadRecord naming what is wrong. A missing kind is ``scalar`` for a number, ``scalars`` for a dict
    and ``text`` for a string.
    """
    key = _check_key(data.get("key"), "key")
    value, step = data.get("value"), data.get("step")
    if step is not None and (type(step) is not int or not 0 <= step < 2**53):
        raise BadRecord(f"log record {key!r}: step must be a non-negative int or None, got {str(step)[:40]!r}")
    kind = data.get("kind")
    if kind is None:
        kind = "scalars" if isinstance(value, dict) else "text" if isinstance(value, str) else "scalar"
    if kind not in KINDS:
        raise BadRecord(f"log record {key!r}: kind must be one of {', '.join(KINDS)}, got {str(kind)[:40]!r}")
    writer = data.get("writer", "")
    if writer not in ("", *WRITERS):
        raise BadRecord(f"log record {key!r}: writer must be one of {', '.join(WRITERS)}, got {str(writer)[:40]!r}")
    if kind in ("scalar", "metric"):
        if not _finite(value):
            raise BadRecord(f"log record {key!r}: a {kind} must be a finite number, got {str(value)[:40]!r}")
    elif kind in ("scalars", "metrics", "params"):
        if not isinstance(value, dict) or not 0 < len(value) <= MAX_ENTRIES:
            raise BadRecord(f"log record {key!r}: {kind} must be a dict of 1 to {MAX_ENTRIES} entries")
        for name, v in value.items():
            _check_key(name, f"a name in {key!r}")
            if kind == "params":
                _check_param(v, f"param {name!r}")
            elif not _finite(v):
                raise BadRecord(f"log record {key!r}: {name!r} must be a finite number, got {str(v)[:40]!r}")
    elif kind == "param":
        _check_param(value, f"param {key!r}")
    elif not isinstance(value, str) or len(value) > MAX_TEXT:
        raise BadRecord(f"log record {key!r}: text must be a string of at most {MAX_TEXT} characters")
    return Record(key, value, step, kind, writer)  # type: ignore[arg-type]


def check_lines(data: Mapping[str, Any]) -> tuple[list[str], int]:
    """A ``log_text`` event's data checked: ``{"lines": [str, ...], "dropped": int}``; returns both."""
    lines, dropped = data.get("lines"), data.get("dropped", 0)
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
        raise BadRecord("log_text: lines must be a list of strings")
    if sum(len(line) for line in lines) > MAX_LOG_BATCH:
        raise BadRecord(f"log_text: more than {MAX_LOG_BATCH} characters in one batch")
    if type(dropped) is not int or dropped < 0:
        raise BadRecord(f"log_text: dropped must be a non-negative int, got {str(dropped)[:40]!r}")
    return lines, dropped


def key_metric_of(spec: Mapping[str, Any] | None) -> str | None:
    tracking = (spec or {}).get("tracking") or {}
    metric = tracking.get("key_metric")
    return metric if isinstance(metric, str) and metric else None


def best_version(history: Iterable[Mapping[str, Any]], key_metric: str) -> tuple[int, float] | None:
    """The best version by ``key_metric`` and its metric, from the store's history (ordered by version): each
    version's metric rates the version before it (see the module docstring); the earliest of equals wins."""
    best: tuple[int, float] | None = None
    before: int | None = None
    for h in history:
        value = (h.get("metrics") or {}).get(key_metric)
        if before and _finite(value) and (best is None or value > best[1]):
            best = (before, float(value))
        before = h["version"]
    return best


class JobSink:
    """One job's tracking thread: its stores, its sites' log files and its best model."""

    def __init__(self, job_id: str, folder: Path, spec: Mapping[str, Any], boards: BoardWriters | None) -> None:
        self.job_id = job_id
        self.folder = folder
        self.name = str(spec.get("name") or job_id)
        tracking = spec.get("tracking") or {}
        self.types = [t for t in tracking.get("types") or () if t in TYPES]
        self.boards = boards
        self.best: float | None = None
        self.dropped = 0
        self.ended = False
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()  # bounded by ``put``
        self._lock = threading.Lock()
        self._closed = False
        self._stores: list[Store] | None = None
        self._logs: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._main, name=f"fedbus-tracking-{job_id[:40]}", daemon=True)
        self.thread.start()

    def put(self, kind: str, item: Any) -> bool:
        """Queue an item; False when this sink's thread has ended (the caller starts a new sink). Records,
        lines and models beyond ``QUEUE_MAX`` waiting are dropped and counted; ``end`` and ``stop`` never are."""
        with self._lock:
            if self._closed:
                return False
            if kind in ("end", "stop") or self._queue.qsize() < QUEUE_MAX:
                self._queue.put_nowait((kind, item))
            else:
                self.dropped += 1
            return True

    def _main(self) -> None:
        stopping = False  # broker shutdown: what is queued is written, then the thread ends without lingering
        while True:
            try:
                kind, item = self._queue.get(block=not stopping, timeout=LINGER_S if self.ended else None)
            except queue.Empty:
                kind, item = "stop", None
            if kind == "stop":
                stopping = True
                with self._lock:
                    if self._queue.empty():
                        self._closed = True
                        break
                continue
            try:
                self._handle(kind, item)
            except Exception:  # a store that fails must not end the thread: the other items still land
                log.exception("tracking write failed", job=self.job_id, item=kind)
        self._close_stores()
        for f in self._logs.values():
            f.close()
        self._logs.clear()
        if self.dropped:
            log.warning("tracking items dropped: the job's queue was full", job=self.job_id, dropped=self.dropped)

    def _handle(self, kind: str, item: Any) -> None:
        if kind == "record":
            site, rec = item
            for store in self._open_stores():
                store.write(site, rec)
        elif kind == "lines":
            self._append(*item)
        elif kind == "best":
            version, model, metric, key = item
            path = self.folder / BEST_MODEL
            meta = {"job_id": self.job_id, "version": str(version), "key_metric": key, "value": repr(metric)}
            serde.write_file(path, serde.layout(model, meta))
            log.info("best global model so far", job=self.job_id, version=version, **{key: metric})
        elif kind == "end":
            self._close_stores()
            for f in self._logs.values():
                f.flush()
            then = item
            if then is not None:
                then()

    def _open_stores(self) -> list[Store]:
        if self._stores is None:
            self._stores = []
            for t in self.types:
                try:
                    store = open_store(
                        t, job_dir=self.folder, job_id=self.job_id, job_name=self.name, boards=self.boards
                    )
                except Exception:
                    log.exception("tracking store cannot open", job=self.job_id, type=t)
                    continue
                if store is not None:
                    self._stores.append(store)
        return self._stores

    def _close_stores(self) -> None:
        for store in self._stores or ():
            try:
                store.close()
            except Exception:
                log.exception("tracking store did not close cleanly", job=self.job_id)
        self._stores = None

    def _append(self, site: str, lines: list[str], dropped: int) -> None:
        f = self._logs.get(site)
        if f is None:
            folder = self.folder / "logs"
            folder.mkdir(exist_ok=True)
            f = self._logs[site] = open(folder / f"{site}.log", "a", encoding="utf-8", errors="replace")  # noqa: SIM115
        if dropped:
            f.write(f"[fedbus: {dropped} bytes of output dropped by the site: over its rate limit]\n")
        f.writelines(line + "\n" for line in lines)
        if self._queue.empty():
            f.flush()


class Tracking:
    """The broker's tracking sinks, one per job with something to write; called on the event loop only."""

    def __init__(
        self,
        job_dir: Callable[[str], Path],
        job_of: Callable[[str], Mapping[str, Any] | None],
        history: Callable[[str], list[dict[str, Any]]],
        boards: BoardWriters | None = None,
    ) -> None:
        self.job_dir = job_dir
        self.job_of = job_of
        self.history = history
        self.boards = boards
        self.sinks: dict[str, JobSink] = {}
        self._keys: dict[str, str | None] = {}  # job -> its key metric, read once
        self._previous: dict[str, tuple[int, Mapping[str, Any]]] = {}  # job -> its latest version, to be rated

    def _spec(self, job_id: str) -> Mapping[str, Any]:
        job = self.job_of(job_id)
        return (job or {}).get("spec") or {}

    def _sink(self, job_id: str) -> JobSink:
        sink = self.sinks.get(job_id)
        if sink is None or sink._closed:
            spec = self._spec(job_id)
            sink = self.sinks[job_id] = JobSink(job_id, self.job_dir(job_id), spec, self.boards)
            key = key_metric_of(spec)
            best = best_version(self.history(job_id), key) if key else None
            sink.best = best[1] if best else None  # best_model.safetensors already holds it
        return sink

    def _put(self, job_id: str, kind: str, item: Any) -> None:
        if not self._sink(job_id).put(kind, item):
            self.sinks.pop(job_id, None)
            self._sink(job_id).put(kind, item)

    @staticmethod
    def wants_records(job: Mapping[str, Any]) -> bool:
        """Whether the job's ``[tracking] types`` names any store for its sites' records."""
        return bool(((job.get("spec") or {}).get("tracking") or {}).get("types"))

    def record(self, job_id: str, site: str, rec: Record) -> None:
        self._put(job_id, "record", (site, rec))

    def lines(self, job_id: str, site: str, lines: list[str], dropped: int) -> None:
        self._put(job_id, "lines", (site, lines, dropped))

    def published(self, job_id: str, version: int, model: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        """A new global version: its metrics rate the version before it, which is written as the best model when
        its key metric beats all the versions before it. The version is kept until the next one rates it."""
        if job_id not in self._keys:
            self._keys[job_id] = key_metric_of(self._spec(job_id))
        key = self._keys[job_id]
        if key is None:
            return
        rated = self._previous.get(job_id)
        self._previous[job_id] = (version, model)
        value = metrics.get(key)
        if rated is None or rated[0] == 0 or not _finite(value):
            return
        sink = self._sink(job_id)
        if sink.best is None or value > sink.best:
            sink.best = float(value)
            self._put(job_id, "best", (rated[0], rated[1], float(value), key))

    def job_ended(self, job_id: str, then: Callable[[], None] | None = None) -> bool:
        """Flush and close the job's stores in its thread, then call ``then`` there; False if it has no sink."""
        self._previous.pop(job_id, None)  # the last version is rated by nothing: its model is let go
        sink = self.sinks.get(job_id)
        if sink is None or sink._closed:
            return False
        sink.ended = True
        return sink.put("end", then)

    def close(self, timeout: float = 10.0) -> None:
        """Broker shutdown: every sink writes what it holds, closes its stores and ends; bounded wait."""
        for sink in self.sinks.values():
            sink.put("stop", None)
        for sink in self.sinks.values():
            sink.thread.join(timeout)
        self.sinks.clear()
