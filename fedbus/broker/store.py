"""The broker's workspace: SQLite for jobs, versions and updates; safetensors files for every global model.

Everything needed to restart lives here. Layout::

    WORKSPACE/fedbus.db                      jobs, versions, updates, events
    WORKSPACE/jobs/JOB/job.zip               the submitted job folder, as deployed to sites
    WORKSPACE/jobs/JOB/files/                the same, unpacked (validated at submit)
    WORKSPACE/jobs/JOB/models/vN.safetensors global model version N (written atomically)
    WORKSPACE/jobs/JOB/kept/TASK.safetensors an accepted update whose aggregate is not checkpointed yet
    WORKSPACE/jobs/JOB/cross_site_val/cross_val_results.json   the cross-site matrix, once that phase ended

SQLite runs in WAL mode with one connection owned by the event loop thread; every statement is small,
so the loop never waits long. Checkpoints are written by ``serde.write_file`` (no concatenation, fsync,
atomic rename) in a worker thread, since tensors of a published version are immutable.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
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

from fedbus.broker.faults import STORE, Backoff, Faults
from fedbus.log import get_logger
from fedbus.modelio import serde

log = get_logger("broker.store")

SYNCHRONOUS = "NORMAL"
"""SQLite's ``synchronous`` setting. With NORMAL a commit does not sync the WAL (only its checkpoints sync): the
store syncs it itself, in a worker thread, and runs what waits for a commit (acknowledgements) once that sync
covers it. FULL would sync inside every commit, on the event loop's thread: several milliseconds a commit on a
real disk, during which no byte moves (docs/benchmarks.md, "Durability"). Commits are batched per loop turn,
and one sync covers every commit made while the previous one ran."""

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

    def __init__(self, workspace: str | Path) -> None:
        self.root = Path(workspace)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "fedbus.db"
        self.db = sqlite3.connect(self.db_path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
        self.db.executescript(SCHEMA)
        if "kept" not in [r[1] for r in self.db.execute("PRAGMA table_info(updates)")]:  # a workspace from before
            self.db.execute("ALTER TABLE updates ADD COLUMN kept TEXT")
        # Only the updates still kept on disk, released at every checkpoint: the index stays small while the
        # table grows, where a scan of every update ever recorded would grow each checkpoint's cost with the
        # job's age (the broker's loop waits for it).
        self.db.execute("CREATE INDEX IF NOT EXISTS updates_kept ON updates (job_id) WHERE kept IS NOT NULL")
        self._kept_logs: dict[str, tuple[int, int]] = {}  # job -> (version its kept updates land in, open file)
        self.faults = Faults()  # what cannot be written now and is being retried (fedbus.broker.faults)
        self._pending: list[tuple[str, Sequence[Any], str | None]] = []  # writes since the last commit that succeeded
        self._waiting: list[Callable[[], None]] = []  # what waits for their commit (acknowledgements)
        self._commit_soon = False  # a commit is scheduled at this turn's end
        self._backoff = Backoff()
        self._retry_timer: asyncio.TimerHandle | None = None
        self._recovered: list[Callable[[], None]] = []
        self._commits = 0  # commits that wrote, since the store opened
        self._synced = 0  # of those, the ones a finished WAL sync covers
        self._syncing = False  # a WAL sync runs in a worker thread
        self._unsynced: list[tuple[int, Callable[[], None]]] = []  # (the commit it needs synced, what then)
        self._wal_fd = -1
        self._to_sync: set[str] = set()  # files to fsync at this turn's end (``sync_soon``)
        self._sync_turn: asyncio.Future[None] | None = None  # done once this turn's files are synced
        self._syncs: set[asyncio.Future[None]] = set()  # syncs running in worker threads

    # --- batched, durable commits --------------------------------------------------------------------------

    def _exec(self, sql: str, args: Sequence[Any] = (), job: str | None = None) -> None:
        """Run one write in the transaction this turn of the event loop shares (committed at the turn's end,
        or sooner by ``commit``); ``job``: the job it is about, named in the log if it fails. A commit per
        update costs the broker's loop several times as much (each commit syncs the WAL); docs/benchmarks.md has
        the figures.

        The statement is also kept until its commit succeeded: a commit that fails (a full disk, an I/O error, a
        read-only file system) loses the transaction, and the store runs the kept statements again once the
        disk takes writes (``_retry``). While it cannot write, writes are only kept. Outside an event loop
        (tools, tests) every write commits at once and a failure raises."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.db.execute(sql, args)
            if not self.db.in_transaction:
                self._commits += 1
                self._sync()
            return
        self._pending.append((sql, args, job))
        if self.faults.get(STORE) is not None:
            return  # the retry runs it
        try:
            if not self.db.in_transaction:
                self.db.execute("BEGIN")
            self.db.execute(sql, args)
        except sqlite3.Error as exc:
            self._failed(exc)
            return
        if not self._commit_soon:
            self._commit_soon = True
            loop.call_soon(self.commit)

    def sync_soon(self, path: str | os.PathLike[str]) -> None:
        """fsync ``path`` and its folder in a worker thread at this turn's end (every file named in a turn in one
        thread call): ``when_recorded`` waits for it. For a kept update's file, whose fsync (a whole model, maybe)
        would stall the loop. Outside an event loop it is synced at once."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            _sync_all([os.fspath(path)])
            return
        if self._sync_turn is None:
            self._sync_turn = loop.create_future()
            loop.call_soon(self._start_syncs)
        self._to_sync.add(os.fspath(path))

    def _start_syncs(self) -> None:
        paths, self._to_sync = sorted(self._to_sync), set()
        done, self._sync_turn = self._sync_turn, None
        assert done is not None
        self._syncs.add(done)

        def finished(task: asyncio.Future[None]) -> None:
            self._syncs.discard(done)
            error = None if task.cancelled() else task.exception()
            if error is not None:  # the data is in memory and in the next checkpoint; the kept copy may not be
                log.error("kept update not synced to disk", paths=paths, error=str(error))
            if not done.done():
                done.set_result(None)

        asyncio.ensure_future(asyncio.to_thread(_sync_all, paths)).add_done_callback(finished)

    def when_recorded(self, then: Callable[[], None]) -> None:
        """Call ``then`` once every write made so far is committed and on stable storage (at once if none waits):
        an update's site hears it was delivered only after that. While the store cannot write, ``then`` waits
        for the retry that succeeds. Files given to ``sync_soon`` are synced first."""
        syncing = [f for f in (*self._syncs, self._sync_turn) if f is not None and not f.done()]
        if syncing:  # only those: files named later are not this caller's (under steady traffic, some always are)
            asyncio.gather(*syncing).add_done_callback(lambda _: self._when_committed(then))
        else:
            self._when_committed(then)

    def _when_committed(self, then: Callable[[], None]) -> None:
        if self._pending or self.faults.get(STORE) is not None:
            self._waiting.append(then)  # the next commit that succeeds, then its sync
        else:
            self._after_sync(then)

    async def recorded(self) -> None:
        """Wait until every write made so far is committed and synced (see ``when_recorded``)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.when_recorded(lambda: done.done() or done.set_result(None))
        await done

    async def synced(self) -> None:
        """Wait until what is committed now is on stable storage (not for writes still kept by a fault): what a
        reply tells from the store (a version in ``status``) is durable when the reply goes."""
        if self._synced < self._commits:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._after_sync(lambda: done.done() or done.set_result(None))
            await done

    def commit(self) -> bool:
        """Commit the open transaction, if any; what waited for it runs once the WAL is synced (``_sync``).
        False while the store cannot write: the writes are kept for the retry, and what waits for them goes on
        waiting."""
        self._commit_soon = False
        if self.faults.get(STORE) is not None:
            return False
        if self.db.in_transaction:
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._failed(exc)
                return False
            self._commits += 1
        self._pending.clear()
        waiting, self._waiting = self._waiting, []
        for then in waiting:
            self._after_sync(then)
        self._sync()
        return True

    def _after_sync(self, then: Callable[[], None]) -> None:
        """Run ``then`` once every commit made so far is synced."""
        if self._synced >= self._commits:
            then()
        else:
            self._unsynced.append((self._commits, then))

    def _sync(self) -> None:
        """fsync the WAL in a worker thread, for every commit not synced yet; the commits made meanwhile wait
        for the next one (one fsync covers them all: a group commit). Outside an event loop: at once."""
        if self._syncing or self._synced >= self._commits:
            return
        target = self._commits
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._fsync_wal()
            self._synced_to(target)
            return
        self._syncing = True

        def done(task: asyncio.Future[None]) -> None:
            self._syncing = False
            error = None if task.cancelled() else task.exception()
            if error is not None:
                self._failed(error)  # the retry makes the log durable another way (a checkpoint)
                return
            self._synced_to(target)
            self._sync()

        loop.run_in_executor(None, self._fsync_wal).add_done_callback(done)

    def _synced_to(self, commits: int) -> None:
        self._synced = max(self._synced, commits)
        ready = [then for at, then in self._unsynced if at <= self._synced]
        self._unsynced = [(at, then) for at, then in self._unsynced if at > self._synced]
        for then in ready:
            then()

    def _fsync_wal(self) -> None:
        """fsync the WAL file (reopened if SQLite replaced it); without one, the database file (blocking: a
        worker thread calls it). Everything committed before the call is then on stable storage: in the WAL, or
        copied to the database by a checkpoint, which with ``synchronous=NORMAL`` syncs both."""
        wal = f"{self.db_path}-wal"
        try:
            if self._wal_fd < 0 or os.stat(wal).st_ino != os.fstat(self._wal_fd).st_ino:
                fd, self._wal_fd = self._wal_fd, os.open(wal, os.O_RDONLY)
                if fd >= 0:
                    os.close(fd)
            os.fsync(self._wal_fd)
        except FileNotFoundError:
            fsync_path(self.db_path)

    def _failed(self, exc: BaseException) -> None:
        """A write, commit or sync failed: the transaction is rolled back (SQLite may have done so already), its
        statements stay kept, and a retry is scheduled after the backoff's next delay."""
        with contextlib.suppress(sqlite3.Error):
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        fault = self.faults.failed(STORE, "the job store", str(self.db_path), exc, None, time.time())
        delay = self._backoff.next()
        fields = {
            "path": fault.path,
            "errno": fault.errno_name,
            "error": fault.error,
            "kept_writes": len(self._pending),
            "jobs": sorted({job for _, _, job in self._pending if job is not None}),
        }
        if fault.attempts == 1:
            log.error("job store write failed: keeping the writes, retrying; every job pauses", **fields)
        else:
            log.debug("job store write failed again", attempts=fault.attempts, retry_in=delay, **fields)
        if self._retry_timer is None:
            with contextlib.suppress(RuntimeError):  # no loop (closing): nothing retries
                self._retry_timer = asyncio.get_running_loop().call_later(delay, self._retry)

    def _retry(self) -> None:
        """Run every kept write again in one transaction, then make everything committed durable by a full
        checkpoint (after a failed fsync, a second fsync may report success for pages the kernel dropped; the
        checkpoint writes them again from the WAL); on success the store is healthy and what waited runs."""
        self._retry_timer = None
        try:
            if self._pending:
                self.db.execute("BEGIN")
                for sql, args, _ in self._pending:
                    self.db.execute(sql, args)
                self.db.execute("COMMIT")
                self._commits += 1
                self._pending.clear()  # committed: a failed checkpoint below must not run them twice
                waiting, self._waiting = self._waiting, []
                self._unsynced += [(self._commits, then) for then in waiting]
            busy = self.db.execute("PRAGMA wal_checkpoint(FULL)").fetchone()[0]
            if busy:  # a reader held the checkpoint back: sync the WAL itself
                self._fsync_wal()
        except (sqlite3.Error, OSError) as exc:
            self._failed(exc)
            return
        fault = self.faults.cleared(STORE)
        self._backoff.reset()
        if fault is not None:
            log.warning(
                "job store writable again: kept writes committed, jobs resume",
                path=fault.path,
                seconds=round(time.time() - fault.since, 3),
                attempts=fault.attempts,
            )
        self._synced_to(self._commits)
        for listener in list(self._recovered):
            listener()

    def on_recovered(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` whenever the store recovers from a fault; returns what stops that."""
        self._recovered.append(listener)
        return lambda: self._recovered.remove(listener) if listener in self._recovered else None

    def _write(self, sql: str, args: Sequence[Any] = (), job: str | None = None) -> None:
        """Every write but an update's record: committed at once, with the turn's batch before it (it may
        delete files the batch's rows name, so the rows must be durable first)."""
        self._exec(sql, args, job)
        self.commit()

    def _write_now(self, sql: str, args: Sequence[Any] = (), job: str | None = None) -> None:
        """A write whose caller answers on it (a submit's reply): committed now, or raises ``OSError`` with the
        reason and is not kept (the caller refuses what it was asked)."""
        fault = self.faults.get(STORE)
        if fault is None:
            at = len(self._pending)
            self._exec(sql, args, job)
            if self.commit():
                return
            del self._pending[at]
            fault = self.faults.get(STORE)
        assert fault is not None
        raise OSError(fault.errno or errno.EIO, fault.describe(time.time()))

    def sync_files(self, folder: Path) -> None:
        """fsync every file under ``folder``, then each folder up to the workspace (its entry in its parent):
        what a submit's reply promises is on stable storage (blocking: call it in a worker thread)."""
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
        if not self.commit() and self._pending:
            log.error(
                "job store closed with writes it could not commit", writes=len(self._pending), path=str(self.db_path)
            )
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        for _, fd in self._kept_logs.values():
            os.close(fd)
        self._kept_logs.clear()
        self.db.close()  # the last connection: SQLite checkpoints the WAL into the database and syncs it
        if self._wal_fd >= 0 and not self._syncing:  # (a sync still running in its thread keeps its descriptor)
            os.close(self._wal_fd)
            self._wal_fd = -1

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

    def jobs(self, states: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT id, name, state, spec, sites, version, reason, created, updated FROM jobs ORDER BY created"
        ).fetchall()
        out = [self._job_row(r) for r in rows]
        return [j for j in out if states is None or j["state"] in states]

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
        serde.write_file(path, serde.layout(model, {"job_id": job_id, "version": str(version)}))
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


def fsync_path(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """fsync a file, or a folder (its entries: files created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_all(paths: Sequence[str]) -> None:
    """fsync each file, then each of their folders once."""
    for path in paths:
        fsync_path(path)
    for folder in sorted({os.path.dirname(p) for p in paths}):
        fsync_path(folder, directory=True)
