"""The broker's workspace: SQLite for jobs, versions and updates; safetensors files for every global model.

Everything needed to restart lives here. Layout::

    WORKSPACE/fedbus.db                      jobs, versions, updates, events
    WORKSPACE/jobs/JOB/job.zip               the submitted job folder, as deployed to sites
    WORKSPACE/jobs/JOB/files/                the same, unpacked (validated at submit)
    WORKSPACE/jobs/JOB/models/vN.safetensors global model version N (written atomically)
    WORKSPACE/jobs/JOB/kept/TASK.safetensors an accepted update whose aggregate is not checkpointed yet
    WORKSPACE/jobs/JOB/cross_site_val/cross_val_results.json   the cross-site matrix, once that phase ended

SQLite runs in WAL mode with one connection owned by the event loop thread; every statement is small,
so the loop never waits long. Writes are batched per loop turn, made durable off the loop, and kept and retried
when the disk refuses them (``fedbus.broker.commits``); what a reply or an acknowledgement tells waits for that.
Checkpoints are written by ``serde.write_file`` (no concatenation, fsync, atomic rename) in a worker thread, since
tensors of a published version are immutable.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedbus.broker.commits import SYNCHRONOUS, Commits, fsync_path
from fedbus.broker.faults import Faults
from fedbus.config import DURABILITY
from fedbus.modelio import serde

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, state TEXT NOT NULL, spec TEXT NOT NULL,
    sites TEXT NOT NULL DEFAULT '[]', version INTEGER NOT NULL DEFAULT 0, reason TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    job_id TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL, metrics TEXT NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (job_id, version)
);
CREATE TABLE IF NOT EXISTS updates (
    job_id TEXT NOT NULL, task_id TEXT NOT NULL, site TEXT NOT NULL, version INTEGER NOT NULL,
    accepted INTEGER NOT NULL, staleness INTEGER, weight REAL, reason TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL, kept TEXT
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL, site TEXT NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL, created REAL NOT NULL
);
"""

_LANDS = "version + COALESCE(staleness, 0) + 1"
"""The global version an accepted update's aggregate becomes: accepted at v with staleness s, it lands in v+s+1."""

CROSS_SITE = "cross_site"
"""The event kind of one cross-site evaluation (``data``: model_name, version, metrics)."""
CROSS_SITE_FILE = "cross_val_results.json"

ACTIVE_STATES = ("uploading", "waiting", "running")
FINAL_STATES = ("finished", "failed", "aborted")


class JobStore:
    """Jobs and their history in one workspace folder."""

    def __init__(self, workspace: str | Path, *, durability: str = "full") -> None:
        """``durability``: "full" (every acknowledgement waits for its fsyncs) or "none" (no fsync at all: a
        throwaway workspace, for simulations and tests; ``fedbus.broker.commits``)."""
        if durability not in DURABILITY:
            raise ValueError(f"durability must be full or none, not {durability!r}")
        self.durable = durability == "full"
        self.root = Path(workspace)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "fedbus.db"
        self.db = sqlite3.connect(self.db_path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={SYNCHRONOUS if self.durable else 'OFF'}")
        self.db.executescript(SCHEMA)
        if "kept" not in [r[1] for r in self.db.execute("PRAGMA table_info(updates)")]:  # a workspace from before
            self.db.execute("ALTER TABLE updates ADD COLUMN kept TEXT")
        # Only the updates still kept on disk, released at every checkpoint: the index stays small while the
        # table grows, where a scan of every update ever recorded would grow each checkpoint's cost with the
        # job's age (the broker's loop waits for it).
        self.db.execute("CREATE INDEX IF NOT EXISTS updates_kept ON updates (job_id) WHERE kept IS NOT NULL")
        self._sites_parsed: dict[str, tuple[str, frozenset[str]]] = {}  # job -> its sites' JSON and its parse
        self._kept_logs: dict[str, tuple[int, int]] = {}  # job -> (version its kept updates land in, open file)
        self.faults = Faults()  # what cannot be written now and is being retried (fedbus.broker.faults)
        self.commits = Commits(self.db, self.db_path, self.faults, durable=self.durable)

    # --- writes: batched, durable, kept and retried when the disk refuses them (fedbus.broker.commits) ------

    def _exec(self, sql: str, args: Sequence[Any] = (), job: str | None = None) -> None:
        self.commits.execute(sql, args, job)

    def commit(self) -> bool:
        """Commit what this turn wrote; False while the disk refuses it (see ``Commits.commit``)."""
        return self.commits.commit()

    def when_recorded(self, then: Callable[[], None]) -> None:
        """Call ``then`` once every write made so far is committed and on stable storage: an update's site hears
        it was delivered only after that (``Commits.when_recorded``)."""
        self.commits.when_recorded(then)

    async def recorded(self) -> None:
        await self.commits.recorded()

    async def synced(self) -> None:
        await self.commits.synced()

    def sync_soon(self, path: str | os.PathLike[str]) -> None:
        self.commits.sync_soon(path)

    def on_recovered(self, listener: Callable[[], None]) -> Callable[[], None]:
        return self.commits.on_recovered(listener)

    def _write(self, sql: str, args: Sequence[Any] = (), job: str | None = None) -> None:
        """Every write but an update's record: committed at once, with the turn's batch before it (it may
        delete files the batch's rows name, so the rows must be durable first)."""
        self._exec(sql, args, job)
        self.commit()

    def _write_now(self, sql: str, args: Sequence[Any] = (), job: str | None = None) -> None:
        self.commits.write_now(sql, args, job)

    def sync_files(self, folder: Path) -> None:
        """fsync every file under ``folder``, then each folder up to the workspace (its entry in its parent):
        what a submit's reply promises is on stable storage (blocking: call it in a worker thread). Not durable:
        nothing."""
        if not self.durable:
            return
        for path in sorted(folder.rglob("*"), reverse=True):
            if path.is_file() and not path.is_symlink():
                fsync_path(path)
            elif path.is_dir():
                fsync_path(path, directory=True)
        here = folder
        while True:
            fsync_path(here, directory=True)
            if here == self.root or self.root not in here.parents:
                break
            here = here.parent

    def close(self) -> None:
        self.commits.close()
        for _, fd in self._kept_logs.values():
            os.close(fd)
        self._kept_logs.clear()
        self.db.close()  # the last connection: SQLite checkpoints the WAL into the database and syncs it
        self.commits.closed()

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    # --- jobs ------------------------------------------------------------------------------------------

    def new_job_id(self, name: str) -> str:
        return f"{name}-{secrets.token_hex(4)}"

    def create_job(self, job_id: str, name: str, spec: dict[str, Any], state: str = "waiting") -> None:
        """A new job's row, committed now (its submitter is answered on it); ``OSError`` when the store
        cannot write."""
        now = time.time()
        self._write_now(
            "INSERT INTO jobs (id, name, state, spec, created, updated) VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, name, state, json.dumps(spec), now, now),
            job_id,
        )

    def set_state(self, job_id: str, state: str, reason: str = "") -> None:
        self._write(
            "UPDATE jobs SET state = ?, reason = ?, updated = ? WHERE id = ?",
            (state, reason, time.time(), job_id),
            job_id,
        )

    def set_sites(self, job_id: str, sites: list[str]) -> None:
        self._write("UPDATE jobs SET sites = ? WHERE id = ?", (json.dumps(sites), job_id), job_id)

    def job(self, job_id: str) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT id, name, state, spec, sites, version, reason, created, updated FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        return None if row is None else self._job_row(row)

    def job_standing(self, job_id: str) -> dict[str, Any] | None:
        """A job's ``state``, ``reason`` and ``sites`` (a frozenset), what ``registry.held_job_verdict`` needs: read
        for every result a site sends, so the spec is not parsed and the sites' list is parsed only when it changed
        (a job of thousands of sites would otherwise decode thousands of names per update)."""
        row = self.db.execute("SELECT state, reason, sites FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        state, reason, raw = row
        cached = self._sites_parsed.get(job_id)
        if cached is None or cached[0] != raw:
            cached = self._sites_parsed[job_id] = (raw, frozenset(json.loads(raw)))
        return {"state": state, "reason": reason, "sites": cached[1]}

    def jobs(self, states: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """Jobs in order of submission, only those in ``states`` if given (filtered by SQLite: every site's hello
        asks for the waiting ones, and parsing every job's spec for it would cost a broker of many sites)."""
        query = "SELECT id, name, state, spec, sites, version, reason, created, updated FROM jobs"
        params: tuple[str, ...] = ()
        if states is not None:
            query += f" WHERE state IN ({', '.join('?' * len(states))})"
            params = states
        rows = self.db.execute(query + " ORDER BY created", params).fetchall()
        return [self._job_row(r) for r in rows]

    def count_by_state(self) -> dict[str, int]:
        """How many jobs are in each state (one small query: metrics scrapes call it)."""
        return dict(self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())

    @staticmethod
    def _job_row(row: tuple) -> dict[str, Any]:
        keys = ("id", "name", "state", "spec", "sites", "version", "reason", "created", "updated")
        job = dict(zip(keys, row, strict=True))
        job["spec"] = json.loads(job["spec"])
        job["sites"] = json.loads(job["sites"])
        return job

    # --- global model versions ---------------------------------------------------------------------------

    def checkpoint_path(self, job_id: str, version: int) -> Path:
        return self.job_dir(job_id) / "models" / f"v{version}.safetensors"

    def write_checkpoint(self, job_id: str, version: int, model: Mapping[str, torch.Tensor]) -> Path:
        """Write the model file (blocking: call it in a worker thread)."""
        path = self.checkpoint_path(job_id, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        serde.write_file(path, serde.layout(model, {"job_id": job_id, "version": str(version)}), durable=self.durable)
        return path

    def add_version(
        self, job_id: str, version: int, path: Path, metrics: Mapping[str, Any], published: float | None = None
    ) -> None:
        """Record a checkpoint written by ``write_checkpoint``: the version now survives a restart. Its
        history time is ``published`` (when it became the global model; default now), not when its file landed:
        a write held up by the disk would otherwise bunch the times of the versions behind it."""
        now = time.time()
        self._write(
            "INSERT OR REPLACE INTO versions (job_id, version, path, metrics, created) VALUES (?, ?, ?, ?, ?)",
            (job_id, version, str(path), json.dumps(dict(metrics)), now if published is None else published),
            job_id,
        )
        self._write("UPDATE jobs SET version = ?, updated = ? WHERE id = ?", (version, now, job_id), job_id)

    def latest_version(self, job_id: str) -> tuple[int, Path] | None:
        row = self.db.execute(
            "SELECT version, path FROM versions WHERE job_id = ? ORDER BY version DESC LIMIT 1", (job_id,)
        ).fetchone()
        return None if row is None else (row[0], Path(row[1]))

    def history(self, job_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT version, metrics, created FROM versions WHERE job_id = ? ORDER BY version", (job_id,)
        ).fetchall()
        return [{"version": v, "metrics": json.loads(m), "time": c} for v, m, c in rows]

    def prune(self, job_id: str, keep: int) -> None:
        """Delete all but the newest ``keep`` checkpoint files (the rows stay, for the history)."""
        if keep <= 0 or not self.commit():  # (a store that cannot write keeps the files its rows may need)
            return
        rows = self.db.execute(
            "SELECT version, path FROM versions WHERE job_id = ? ORDER BY version DESC", (job_id,)
        ).fetchall()
        for _, path in rows[keep:]:
            Path(path).unlink(missing_ok=True)

    # --- updates and events --------------------------------------------------------------------------------

    def record_update(
        self,
        job_id: str,
        task_id: str,
        site: str,
        version: int,
        *,
        accepted: bool,
        staleness: int | None = None,
        weight: float | None = None,
        reason: str = "",
        kept: Mapping[str, Any] | None = None,
    ) -> None:
        """``kept``: where an accepted update's params lie on disk and what folding it again needs (its data
        weight, metrics), until a recorded checkpoint covers it (``release_covered``).

        Inside a running event loop the row joins the turn's batch (``when_recorded``); outside one it is
        committed at once."""
        self._exec(
            "INSERT INTO updates (job_id, task_id, site, version, accepted, staleness, weight, reason, created, kept) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job_id,
                task_id,
                site,
                version,
                int(accepted),
                staleness,
                weight,
                reason,
                time.time(),
                None if kept is None else json.dumps(dict(kept)),
            ),
            job_id,
        )

    def kept_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "kept"

    def keep_small(self, job_id: str, lands: int, parts: Sequence[memoryview]) -> dict[str, Any]:
        """Keep a small accepted update that lands in version ``lands``: appended to that version's log file
        of the job, synced before its site hears it was delivered (``sync_soon``).
        Every update in one log lands in the same version, so one checkpoint releases the whole file.
        ``parts`` are the bytes of a safetensors file. Returns where it is (the ``kept`` entry's path, offset
        and length)."""
        path = self.kept_dir(job_id) / f"lands-{lands}.log"
        current = self._kept_logs.get(job_id)
        if current is None or current[0] != lands:
            if current is not None:
                os.close(current[1])
            path.parent.mkdir(parents=True, exist_ok=True)
            current = self._kept_logs[job_id] = (lands, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        offset = serde.append_to(current[1], parts)
        self.sync_soon(path)
        return {"path": str(path), "offset": offset, "length": sum(memoryview(p).nbytes for p in parts)}

    def kept_updates(self, job_id: str, version: int) -> list[dict[str, Any]]:
        """Accepted updates kept on disk whose aggregate lands after ``version``, in the order they were accepted:
        what a broker restarted from checkpoint ``version`` folds again."""
        rows = self.db.execute(
            "SELECT rowid, task_id, site, version, staleness, kept FROM updates "
            f"WHERE job_id = ? AND accepted = 1 AND kept IS NOT NULL AND {_LANDS} > ? ORDER BY rowid",
            (job_id, version),
        ).fetchall()
        keys = ("rowid", "task_id", "site", "version", "staleness")
        return [{**dict(zip(keys, r[:5], strict=True)), "kept": json.loads(r[5])} for r in rows]

    def refold_update(self, rowid: int, staleness: int, weight: float) -> None:
        """A kept update folded again after a restart, with the staleness and coefficient it got this time."""
        self._write("UPDATE updates SET staleness = ?, weight = ? WHERE rowid = ?", (staleness, weight, rowid))

    def drop_update(self, rowid: int, reason: str) -> None:
        """A kept update that could not be folded again: dropped, with the reason; its file goes (once the
        store can write)."""
        self._unlink_kept("rowid = ?", (rowid,))
        self._write("UPDATE updates SET accepted = 0, reason = ?, kept = NULL WHERE rowid = ?", (reason, rowid))

    def release_covered(self, job_id: str, version: int | None = None) -> int:
        """Delete the kept files of updates folded into checkpoint ``version`` or before (all of the job's when
        None: it ended). Returns how many."""
        args: tuple[str | int, ...]
        where, args = "job_id = ? AND kept IS NOT NULL", (job_id,)
        if version is not None:
            where, args = f"{where} AND (accepted = 0 OR {_LANDS} <= ?)", (job_id, version)
        current = self._kept_logs.get(job_id)
        if current is not None and (version is None or current[0] <= version):
            os.close(self._kept_logs.pop(job_id)[1])  # its file is about to go
        n = self._unlink_kept(where, args)
        if n < 0:
            return 0  # the store cannot write: a later checkpoint (or the job's end) releases them
        self._write(f"UPDATE updates SET kept = NULL WHERE {where}", args, job_id)
        if version is None:
            shutil.rmtree(self.kept_dir(job_id), ignore_errors=True)  # and what a killed broker half wrote
        return n

    def _unlink_kept(self, where: str, args: Sequence[Any]) -> int:
        """Delete the kept files the rows ``where`` name; -1 (nothing deleted) while the store cannot write."""
        if not self.commit():  # the rows naming these files are durable first
            return -1
        rows = self.db.execute(f"SELECT kept FROM updates WHERE {where} AND kept IS NOT NULL", args).fetchall()
        for path in {json.loads(kept)["path"] for (kept,) in rows}:  # small updates share one log per version
            Path(path).unlink(missing_ok=True)
        return len(rows)

    def unapply_after(self, job_id: str, version: int) -> int:
        """After a restart from checkpoint ``version``: accepted updates whose aggregate went into a later,
        never-checkpointed version (a FedAvg round in progress, a FedBuff update whose file is gone) were lost
        with the process; record them as dropped, with the reason, instead of leaving them counted. An update
        accepted at global version v with staleness s lands in version v + s + 1. Updates kept on disk (FedBuff)
        stay accepted: the restarted controller folds them again (``kept_updates``). Returns how many."""
        reason = f"accepted into an aggregate the broker lost when it stopped (resumed from version {version})"
        lost = [
            rowid
            for rowid, kept in self.db.execute(
                f"SELECT rowid, kept FROM updates WHERE job_id = ? AND accepted = 1 AND {_LANDS} > ?", (job_id, version)
            ).fetchall()
            if kept is None or not Path(json.loads(kept)["path"]).is_file()
        ]
        for rowid in lost:
            self._exec(
                "UPDATE updates SET accepted = 0, reason = ?, kept = NULL WHERE rowid = ?", (reason, rowid), job_id
            )
        self.commit()
        return len(lost)

    def updates(self, job_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT task_id, site, version, accepted, staleness, weight, reason FROM updates WHERE job_id = ?",
            (job_id,),
        ).fetchall()
        keys = ("task_id", "site", "version", "accepted", "staleness", "weight", "reason")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def record_event(self, job_id: str, site: str, kind: str, data: Mapping[str, Any]) -> None:
        self._write(
            "INSERT INTO events (job_id, site, kind, data, created) VALUES (?, ?, ?, ?, ?)",
            (job_id, site, kind, json.dumps(dict(data), default=str), time.time()),
            job_id,
        )

    def event_bytes(self, job_id: str) -> dict[str, int]:
        """Bytes of the job's event rows by site, as their sites sent them (cross-site cells are the broker's)."""
        rows = self.db.execute(
            "SELECT site, SUM(LENGTH(data)) FROM events WHERE job_id = ? AND kind != ? GROUP BY site",
            (job_id, CROSS_SITE),
        ).fetchall()
        return {site: int(size or 0) for site, size in rows}

    def record_cross_site(self, job_id: str, site: str, model_name: str, version: int, metrics: Mapping) -> None:
        """One cell of the cross-site matrix: ``site`` evaluated the model named ``model_name``."""
        self.record_event(job_id, site, CROSS_SITE, {"model_name": model_name, "version": version, "metrics": metrics})

    def cross_site(self, job_id: str) -> dict[str, dict[str, dict[str, float]]]:
        """The cross-site matrix ``{model_name: {site: metrics}}`` (a cell evaluated again keeps the last)."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for event in self.events(job_id, CROSS_SITE):
            data = event["data"]
            out.setdefault(data["model_name"], {})[event["site"]] = data["metrics"]
        return out

    def write_cross_site(self, job_id: str, matrix: Mapping[str, Any]) -> Path:
        """``matrix`` (from :meth:`cross_site`) as ``cross_site_val/cross_val_results.json`` in the job's folder
        (FLARE's file name), written whole: a reader never sees half of it. Touches no SQLite (any thread)."""
        folder = self.job_dir(job_id) / "cross_site_val"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CROSS_SITE_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(matrix, indent=2, sort_keys=True))
        tmp.replace(path)
        return path

    def events(self, job_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT site, kind, data, created FROM events WHERE job_id = ? ORDER BY rowid", (job_id,)
        ).fetchall()
        return [{"site": s, "kind": k, "data": json.loads(d), "time": c} for s, k, d, c in rows if kind in (None, k)]
