"""What a recipe's execution leaves: a ``Run``, filled from the broker's download once the job has ended.

Why one shape for every environment: a notebook that compares FedAvg with FedBuff in SimEnv must read the
same fields when the job later runs in production. All of them come from the broker (its download op:
metrics history, update records, evaluation records, the final model); environments that own the
broker's workspace (SimEnv, PocEnv) add every checkpoint, and those that own the sites add the sites'
own record of each task (``tasks``: training time, simulated delay, bytes of params that left the site).

Times are seconds since the job started (its version 0 was recorded), so runs are comparable however long
their environments took to start.

FLARE's ``Run`` methods are here too: ``get_status()``, ``get_result()`` (the folder holding the run's
results: the broker's job folder for SimEnv and PocEnv, the downloaded folder for ProdEnv) and
``get_job_id()``. ``repr(run)`` is one short line; the model's tensors are never printed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedbus.modelio import serde

if TYPE_CHECKING:
    from fedbus.recipes._driver import Execution

FINAL_STATES = ("finished", "failed", "aborted")
SIM_TIME_KEY = "sim/time_s"
"""On a simulated clock (``SimEnv(clock="simulated")``) each version's metrics carry its simulated time under this
key; ``history`` entries then have ``sim_time`` (simulated seconds since the simulation began) beside ``time``."""
SCAFFOLD_PREFIX = "scaffold.c."
"""SCAFFOLD's control variates travel with the global model under this prefix; ``Run.model`` leaves them out."""
BEST_MODEL_FILE = "best_model.safetensors"
WEIGHT_KEYS = ("num_samples", "NUM_SAMPLES", "n")
"""Metrics an evaluation may report to weigh its site in the mean; without one, sites weigh the same."""


@dataclass
class Evaluation:
    """One global version evaluated on every site's local data: metrics per site and their weighted mean."""

    version: int
    sites: dict[str, dict[str, float]]
    mean: dict[str, float]
    time: float = 0.0


@dataclass(repr=False)
class Run:
    """A recipe's execution: ``wait()`` for it, ``abort()`` it, then read what it produced."""

    job_id: str
    workspace: Path
    name: str = ""
    status: str = "running"
    reason: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[tuple[int, float, Path]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, torch.Tensor] | None = None
    model_path: Path | None = None
    timing: dict[str, float] = field(default_factory=dict)
    cross_site: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """Cross-site evaluation: ``{model name: {site: metrics}}`` (``server`` is the final global model)."""
    best_model_path: Path | None = None
    """The global model that scored best on the job's key metric, when the broker kept one."""
    result_dir: Path | None = None
    _execution: Execution | None = field(default=None, repr=False, compare=False)

    @property
    def done(self) -> bool:
        return self.status in FINAL_STATES

    @property
    def version(self) -> int | None:
        """The last global version (None before any)."""
        return self.history[-1]["version"] if self.history else None

    @property
    def metrics(self) -> dict[str, Any]:
        """The metrics that came with the last global version."""
        return dict(self.history[-1]["metrics"]) if self.history else {}

    # --- FLARE's Run methods ------------------------------------------------------------------------------

    def get_job_id(self) -> str:
        return self.job_id

    def get_status(self) -> str:
        """``running``, ``finished``, ``failed`` or ``aborted`` (``reason`` says why a run did not finish)."""
        return self.status

    def get_result(self, timeout: float = 0.0, clean_up: bool = True) -> str | None:
        """Wait for the run's end (``timeout`` seconds, 0: no limit) and return its result folder: the final
        model, checkpoints (``models/``), cross-site results (``cross_site_val/``), tracking files and
        streamed logs. ``clean_up`` is accepted for FLARE's signature: fedbus keeps the workspace."""
        self.wait(timeout or None)
        return os.fspath(self.result_dir) if self.result_dir is not None else None

    def __repr__(self) -> str:
        shown = self.metrics or (self.evaluations[-1].mean if self.evaluations else {})
        metrics = {k: round(v, 4) for k, v in shown.items() if _is_number(v) and "/" not in k}
        return (
            f"Run(job_id={self.job_id!r}, name={self.name!r}, status={self.status!r}, version={self.version}, "
            f"metrics={metrics}, model_path={os.fspath(self.model_path) if self.model_path else None!r})"
        )

    def wait(self, timeout: float | None = None) -> Run:
        """Follow the job to its end (showing progress) and return this run, filled in.

        Raises TimeoutError after ``timeout`` seconds (the job goes on). Anything else that interrupts
        the wait, a KeyboardInterrupt above all, aborts the job and stops the environment first.
        """
        if self._execution is not None:
            self._execution.wait(timeout)
        return self

    def abort(self) -> None:
        """Ask the broker to abort the job; ``wait()`` then returns with status ``aborted``."""
        if self._execution is not None and not self.done:
            self._execution.abort()

    def fill(
        self,
        download: Mapping[str, Any],
        *,
        job: Mapping[str, Any],
        checkpoint_dir: Path | None,
        result_dir: Path | None = None,
        he_context: Path | None = None,
    ) -> None:
        """Take the broker's download (and the final status entry of the job) into this run; ``he_context``
        (the sites' secret CKKS context, where the environment made it) decrypts an encrypted job's model."""
        self.status = str(job.get("state", download.get("state", "failed")))
        self.reason = str(job.get("reason", ""))
        raw = list(download.get("history", []))
        t0 = _start_time(raw, job)
        self.history = [
            {"version": h["version"], "time": round(h["time"] - t0, 3), "metrics": dict(h["metrics"])} for h in raw
        ]
        if any(SIM_TIME_KEY in h["metrics"] for h in self.history):  # a simulated clock: its seconds beside the wall's
            for h in self.history:
                h["sim_time"] = float(h["metrics"].get(SIM_TIME_KEY, 0.0))
        self.updates = [dict(u) for u in download.get("updates", [])]
        self.evaluations = group_evaluations(download.get("evaluations", []), t0)
        path = download.get("model_path")
        self.model_path = Path(path) if path else None
        if self.model_path is not None:
            self.model = {
                k: v.clone() for k, v in serde.read_file(self.model_path).items() if not k.startswith(SCAFFOLD_PREFIX)
            }
            if he_context is not None:
                from fedbus.he.codec import decrypt_params
                from fedbus.he.context import load_site_context

                self.model = decrypt_params(load_site_context(he_context), self.model)
        cross = download.get("cross_site")
        self.cross_site = {str(m): {str(s): dict(v) for s, v in row.items()} for m, row in (cross or {}).items()}
        self.result_dir = result_dir
        best = download.get("best_model_path")
        if best:
            self.best_model_path = Path(best)
        elif result_dir is not None:
            found = [p for p in (result_dir / BEST_MODEL_FILE, result_dir / "models" / BEST_MODEL_FILE) if p.is_file()]
            self.best_model_path = found[0] if found else None
        self.checkpoints = []
        for h in self.history:
            if checkpoint_dir is not None:
                file = checkpoint_dir / f"v{h['version']}.safetensors"
                if file.is_file():
                    self.checkpoints.append((h["version"], h["time"], file))
            elif self.model_path is not None and h["version"] == download.get("version"):
                self.checkpoints.append((h["version"], h["time"], self.model_path))

    def summary(self) -> str:
        """One line for logs and examples: status, version, final metrics, overhead when measured."""
        metrics = " ".join(f"{k}={v:.4g}" for k, v in self.metrics.items() if isinstance(v, float) and "/" not in k)
        timing = f" wall={self.timing['wall_s']:.2f}s" if "wall_s" in self.timing else ""
        return f"{self.job_id}: {self.status} at version {self.version} {metrics}{timing}".strip()


def _start_time(history: list[Mapping[str, Any]], job: Mapping[str, Any]) -> float:
    for h in history:
        if h.get("version") == 0:
            return float(h["time"])
    return float(job.get("created") or (history[0]["time"] if history else 0.0))


def _weight(metrics: Mapping[str, Any]) -> float:
    for key in WEIGHT_KEYS:
        w = metrics.get(key)
        if isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w > 0:
            return float(w)
    return 1.0


def group_evaluations(events: Iterable[Mapping[str, Any]], t0: float = 0.0) -> list[Evaluation]:
    """The broker's evaluation records (``{"site", "data": {"version", **metrics}, "time"}``) per version.

    The mean of each metric is weighted by a site's ``num_samples`` metric when it reports one, over the
    sites that reported that metric.
    """
    by_version: dict[int, Evaluation] = {}
    for ev in events:
        data = dict(ev.get("data", {}))
        version = data.pop("version", None)
        if not isinstance(version, int):
            continue
        e = by_version.setdefault(version, Evaluation(version, {}, {}, round(float(ev.get("time", t0)) - t0, 3)))
        e.sites[str(ev.get("site"))] = {k: v for k, v in data.items() if _is_number(v)}
    for e in by_version.values():
        sums: dict[str, list[float]] = {}
        for metrics in e.sites.values():
            w = _weight(metrics)
            for k, v in metrics.items():
                if k not in WEIGHT_KEYS:
                    acc = sums.setdefault(k, [0.0, 0.0])
                    acc[0] += w * v
                    acc[1] += w
        e.mean = {k: s / w for k, (s, w) in sums.items() if w > 0}
    return [by_version[v] for v in sorted(by_version)]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def busy_seconds(tasks: Iterable[Mapping[str, Any]]) -> float:
    """Seconds during which at least one script was working on a task: the union of the sites' intervals
    ``[received_at - train_s, received_at]`` (training loops that overlap count once)."""
    spans = sorted(
        (float(t["received_at"]) - float(t["train_s"]), float(t["received_at"]))
        for t in tasks
        if _is_number(t.get("received_at")) and _is_number(t.get("train_s"))
    )
    total, end = 0.0, -math.inf
    for a, b in spans:
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total
