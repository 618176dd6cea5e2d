"""The store's way to disk: batched commits, made durable off the event loop, kept and retried when they fail.

Theory of operation. Every write of the job store (``fedbus.broker.store``) runs in the transaction that one turn
of the broker's event loop shares, and is committed at the turn's end: one commit for all the updates a turn
recorded. SQLite runs with ``synchronous=NORMAL`` (its commits do not sync), and the WAL is fsynced here, in a
worker thread, after each commit; what waits for a commit (an update's acknowledgement, ``when_recorded``; an admin
reply, ``synced``) runs once a finished sync covers it. Commits made while a sync runs share the next one (a
group commit). Files that must be durable with the rows naming them (a kept update) are fsynced in a worker
thread too (``sync_soon``) and waited for the same way.

A write that fails (ENOSPC, EIO, EROFS: SQLite rolls the transaction back) loses nothing: each statement is kept
until a commit that includes it succeeded, the fault is registered (``fedbus.broker.faults``: every job pauses),
and the kept statements run again, in order, after the backoff's delays, until they commit. What waits for them
waits on. A failed WAL sync is never trusted to a second fsync (the kernel may have dropped the pages it could not
write): the retry runs a full checkpoint, which writes the WAL into the database and syncs both. Outside an event
loop (tools, tests) every write commits and syncs at once, and a failure raises.

A store opened with ``durable=False`` (the broker's ``durability = "none"``: a throwaway workspace, for simulations
and tests) syncs nothing: SQLite runs with ``synchronous=OFF``, a commit counts as synced at once, and
``sync_soon`` does nothing. Commits stay batched and failed writes are still kept and retried; only the fsyncs,
and the worker-thread hand-offs they cost, are gone, so a crash of the machine may lose what was acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedbus.broker.faults import STORE, Backoff, Faults
from fedbus.log import get_logger

log = get_logger("broker.store")

SYNCHRONOUS = "NORMAL"
"""SQLite's ``synchronous`` setting. With NORMAL a commit does not sync the WAL (only its checkpoints sync): the
store syncs it itself, in a worker thread, and runs what waits for a commit (acknowledgements) once that sync
covers it. FULL would sync inside every commit, on the event loop's thread: several milliseconds a commit on a
real disk, during which no byte moves (docs/benchmarks.md, "Durability"). Commits are batched per loop turn,
and one sync covers every commit made while the previous one ran."""


class Commits:
    """The durable, batched, retried writes of one SQLite connection, owned by the event loop's thread."""

    def __init__(self, db: sqlite3.Connection, db_path: Path, faults: Faults, *, durable: bool = True) -> None:
        self.db = db
        self.durable = durable
        self.db_path = db_path
        self.faults = faults
        self._pending: list[tuple[str, Sequence[Any], str | None]] = []  # writes since the last commit that succeeded
        self._waiting: list[Callable[[], None]] = []  # what waits for their commit (acknowledgements)
        self._commit_soon = False  # a commit is scheduled at this turn's end
        self._backoff = Backoff()
        self._retry_timer: asyncio.TimerHandle | None = None
        self._recovered: list[Callable[[], None]] = []
        self._committed = 0  # commits that wrote, since the store opened
        self._synced = 0  # of those, the ones a finished WAL sync covers
        self._syncing = False  # a WAL sync runs in a worker thread
        self._unsynced: list[tuple[int, Callable[[], None]]] = []  # (the commit it needs synced, what then)
        self._wal_fd = -1
        self._replies: list[asyncio.Future[None]] = []  # replies waiting in ``synced``
        self._to_sync: set[str] = set()  # files to fsync at this turn's end (``sync_soon``)
        self._sync_turn: asyncio.Future[None] | None = None  # done once this turn's files are synced
        self._syncs: set[asyncio.Future[None]] = set()  # syncs running in worker threads

    def execute(self, sql: str, args: Sequence[Any] = (), job: str | None = None) -> None:
        """Run one write in the transaction this turn of the event loop shares (committed at the turn's end,
        or sooner by ``commit``); ``job``: the job it is about, named in the log if it fails. A commit per
        update costs the broker's loop several times as much (each commit writes and syncs the WAL);
        docs/benchmarks.md has the figures.

        The statement is also kept until its commit succeeded: a commit that fails (a full disk, an I/O error, a
        read-only file system) loses the transaction, and the store runs the kept statements again once the
        disk takes writes (``_retry``). While it cannot write, writes are only kept. Outside an event loop
        (tools, tests) every write commits at once and a failure raises."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.db.execute(sql, args)
            if not self.db.in_transaction:
                self._committed += 1
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
        would stall the loop. Outside an event loop it is synced at once. Not durable: nothing."""
        if not self.durable:
            return
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
        self.when_recorded(functools.partial(_resolve, done))
        await done

    async def synced(self) -> None:
        """Wait until what is committed now is on stable storage: what a reply tells from the store (a version in
        ``status``) is durable when the reply goes. Not while the store is failing: the reply goes at once (a
        status then says the jobs are paused, and why), where waiting would hold it until the disk recovers."""
        if self._synced < self._committed and self.faults.get(STORE) is None:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._after_sync(functools.partial(_resolve, done))
            self._replies.append(done)  # (released by a fault that begins meanwhile too)
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
            self._committed += 1
        self._pending.clear()
        waiting, self._waiting = self._waiting, []
        for then in waiting:
            self._after_sync(then)
        self._sync()
        return True

    def _after_sync(self, then: Callable[[], None]) -> None:
        """Run ``then`` once every commit made so far is synced."""
        if self._synced >= self._committed:
            then()
        else:
            self._unsynced.append((self._committed, then))

    def _sync(self) -> None:
        """fsync the WAL in a worker thread, for every commit not synced yet; the commits made meanwhile wait
        for the next one (one fsync covers them all: a group commit). Outside an event loop: at once."""
        if self._syncing or self._synced >= self._committed:
            return
        target = self._committed
        if not self.durable:
            self._synced_to(target)
            return
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
        self._replies = [reply for reply in self._replies if not reply.done()]
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
        replies, self._replies = self._replies, []
        for reply in replies:
            if not reply.done():
                reply.set_result(None)
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
                self._committed += 1
                self._pending.clear()  # committed: a failed checkpoint below must not run them twice
                waiting, self._waiting = self._waiting, []
                self._unsynced += [(self._committed, then) for then in waiting]
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
        self._synced_to(self._committed)
        for listener in list(self._recovered):
            listener()

    def on_recovered(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` whenever the store recovers from a fault; returns what stops that."""
        self._recovered.append(listener)
        return lambda: self._recovered.remove(listener) if listener in self._recovered else None

    def write_now(self, sql: str, args: Sequence[Any] = (), job: str | None = None) -> None:
        """A write whose caller answers on it (a submit's reply): committed now, or raises ``OSError`` with the
        reason and is not kept (the caller refuses what it was asked)."""
        fault = self.faults.get(STORE)
        if fault is None:
            at = len(self._pending)
            self.execute(sql, args, job)
            if self.commit():
                return
            del self._pending[at]
            fault = self.faults.get(STORE)
        assert fault is not None
        raise OSError(fault.errno or errno.EIO, fault.describe(time.time()))

    def close(self) -> None:
        """Commit what is left (logged if the disk refuses it) and stop retrying; the caller closes the
        connection, then calls ``closed``."""
        if not self.commit() and self._pending:
            log.error("job store closed with writes it could not commit", writes=len(self._pending), path=self.db_path)
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None

    def closed(self) -> None:
        if self._wal_fd >= 0 and not self._syncing:  # (a sync still running in its thread keeps its descriptor)
            os.close(self._wal_fd)
            self._wal_fd = -1


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


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
