"""Executing a recipe in any environment: export, start, submit, follow, download, stop.

Theory of operation. The recipes' API is synchronous (notebooks, scripts), the bus is asyncio; so each
execution owns an event loop in a daemon thread (``LoopThread``) and the calling thread talks to it with
``run_coroutine_threadsafe``. An environment contributes a ``Backend``: how to start a broker (and sites)
and stop them again, where the broker's checkpoints are, and what the sites recorded per task. The rest
is the same for SimEnv, PocEnv and ProdEnv, so the three cannot drift apart:

1. ``recipe.export()`` writes the job folder (in the caller's thread: a bad recipe fails at once);
2. on the loop: the backend starts, an ``Admin`` connects, waits until the expected sites are online, and
   submits the folder (the job id is known when ``execute`` returns, even with ``wait=False``);
3. ``follow`` polls the job's status, publishing each snapshot for ``Run.wait()`` to report, downloads the
   results once the job ended, and stops the backend whatever happened (``finally``);
4. ``Run.wait()`` reports snapshots in the caller's thread until ``follow`` is done. If the wait itself is
   interrupted (Ctrl-C, or a progress callback raising), the job is aborted and the backend stopped, then
   ``kill()``-ed, before the exception goes on: no environment outlives the caller's interest in it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from fedbus.admin import Admin
from fedbus.errors import FedbusError, JobError, TransportError
from fedbus.log import get_logger
from fedbus.recipes.progress import Progress, Reporter, make_reporter
from fedbus.recipes.run import FINAL_STATES, Run, busy_seconds
from fedbus.transport.context import Context

if TYPE_CHECKING:
    from fedbus.recipes.recipe import Recipe

T = TypeVar("T")
log = get_logger("recipes")
CROSS_SITE_FILE = "cross_site_val/cross_val_results.json"
MAX_STATUS_MISSES = 3
"""Status requests in a row that may go unanswered before a run gives up; each waits the admin timeout, sent again
meanwhile to a broker that restarted (``fedbus.admin``), so a restart within that timeout costs no miss."""


class LoopThread:
    """An asyncio event loop running in a daemon thread until ``stop``."""

    def __init__(self, name: str, factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop) -> None:
        self.loop = factory()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.submit(coro).result(timeout)

    def stop(self, join_s: float = 10.0) -> None:
        with contextlib.suppress(RuntimeError):  # already closed
            self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(join_s)


class Backend(Protocol):
    """What an environment adds to an execution (see the module docstring)."""

    workspace: Path
    expected_sites: int | None
    poll_s: float

    async def start(self, ctx: Context) -> str:
        """Start what this environment runs itself; return the broker's address."""

    async def stop(self) -> None:
        """Stop it again, gracefully but within bounds."""

    def kill(self) -> None:
        """Last resort from any thread: end whatever is still running, now."""

    def watch(self) -> None:
        """Called at every status poll (PocEnv notes the PIDs of the training scripts)."""

    def checkpoint_dir(self, job_id: str) -> Path | None:
        """Where the broker keeps this job's checkpoints, when it is on this machine."""

    def result_dir(self, job_id: str) -> Path | None:
        """The broker's folder of this job, when it is on this machine (else the download is the result)."""

    def task_records(self, job_id: str) -> list[dict[str, Any]]:
        """The sites' own record of each result they relayed, when the sites are ours."""


def next_folder(parent: Path, name: str) -> Path:
    """A new folder ``parent/name-N`` (the first N free), for one execution's files."""
    parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while (parent / f"{name}-{n}").exists():
        n += 1
    path = parent / f"{name}-{n}"
    path.mkdir()
    return path


def keep_download(data: dict[str, Any], dest: Path) -> None:
    """Where the broker's folder is not ours (ProdEnv), the download folder is the result: it gets the
    history and, when there was one, the cross-site matrix where the broker keeps it."""
    (dest / "history.json").write_text(json.dumps(data.get("history", []), indent=1, default=str))
    if data.get("cross_site"):
        (dest / CROSS_SITE_FILE).parent.mkdir(parents=True, exist_ok=True)
        (dest / CROSS_SITE_FILE).write_text(json.dumps(data["cross_site"], indent=1, default=str))


def execute(backend: Backend, recipe: Recipe, *, wait: bool, progress: Any) -> Run:
    """Run ``recipe`` on ``backend``: the shared path of SimEnv, PocEnv and ProdEnv."""
    started = time.monotonic()
    folder = recipe.export(next_folder(backend.workspace / "jobs", recipe.name))
    ex = Execution(backend, recipe, make_reporter(progress), started)
    starting = ex.loop.submit(ex.start(folder))
    try:
        job_id = starting.result()
    except BaseException:
        starting.cancel()
        with contextlib.suppress(Exception):
            concurrent.futures.wait([starting], timeout=10.0)
        ex.shutdown_now()
        raise
    run = Run(job_id=job_id, workspace=backend.workspace, name=recipe.name, _execution=ex)
    ex.begin(run)
    if wait:
        run.wait()
    return run


class Execution:
    """One recipe's run on one backend: the loop thread, the admin connection, the snapshots."""

    def __init__(self, backend: Backend, recipe: Recipe, reporter: Reporter | None, started: float) -> None:
        self.backend = backend
        self.recipe = recipe
        self.reporter = reporter
        self.started = started
        # A backend may run on a loop of its own kind (SimEnv's simulated clock: ``fedbus.recipes.simtime``).
        self.loop = LoopThread(f"fedbus-{recipe.name}", getattr(backend, "loop_factory", asyncio.new_event_loop))
        self.ctx: Context | None = None
        self.admin: Admin | None = None
        self.job_id = ""
        self.future: concurrent.futures.Future[None] | None = None
        self._cond = threading.Condition()
        self._snapshot: Progress | None = None
        self._seq = 0
        self._seen = 0
        self._interrupted = False
        self._wake: asyncio.Event | None = None
        self._timing: dict[str, float] = {}

    # --- on the loop -----------------------------------------------------------------------------------

    async def start(self, folder: Path) -> str:
        self._wake = asyncio.Event()
        self.ctx = Context()
        address = await self.backend.start(self.ctx)
        self.admin = Admin(address, ctx=self.ctx, **getattr(self.backend, "admin_options", {}))
        await self.admin.__aenter__()
        if self.backend.expected_sites:
            await self._wait_for_sites(self.backend.expected_sites)
        self._timing["startup_s"] = time.monotonic() - self.started
        self.job_id = await self.admin.submit(folder)
        log.info("job submitted", job_id=self.job_id, recipe=self.recipe.name, strategy=self.recipe.strategy)
        return self.job_id

    async def _wait_for_sites(self, n: int, timeout: float = 120.0) -> None:
        assert self.admin is not None
        deadline = time.monotonic() + timeout
        while True:
            online = sum(1 for s in (await self.admin.request("sites"))["sites"] if s["online"])
            if online >= n:
                return
            if time.monotonic() > deadline:
                raise JobError(f"only {online} of {n} sites came online within {timeout:.0f} s")
            await asyncio.sleep(0.05)

    async def follow(self, run: Run) -> None:
        assert self.admin is not None and self._wake is not None
        misses = 0
        try:
            while True:
                if self._interrupted:  # the caller gave up: no download, just stop everything
                    run.status, run.reason = "aborted", "interrupted while waiting"
                    return
                try:
                    job = (await self.admin.status(self.job_id))["jobs"][0]
                except TransportError as exc:  # a broker restarting resumes its jobs: give it a while
                    misses += 1
                    if misses >= MAX_STATUS_MISSES:
                        run.status, run.reason = "failed", f"lost the broker: {exc}"
                        raise
                    log.warning("no status from the broker: retrying", job_id=self.job_id, reason=str(exc))
                    continue
                misses = 0
                self.backend.watch()
                self._publish(Progress.from_status(job, self.recipe.total, time.monotonic() - self.started))
                if job["state"] in FINAL_STATES:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.backend.poll_s)
                self._wake.clear()
            dest = self.backend.workspace / "results" / self.job_id
            data = await self.admin.download(self.job_id, dest)
            result_dir = self.backend.result_dir(self.job_id)
            if result_dir is None or not result_dir.is_dir():
                result_dir = dest
                await asyncio.to_thread(keep_download, data, dest)
            he = getattr(self.backend, "he_keys", None)  # SimEnv's and PocEnv's own keys: the model decrypted
            run.fill(
                data,
                job=job,
                checkpoint_dir=self.backend.checkpoint_dir(self.job_id),
                result_dir=result_dir,
                he_context=he.site if he is not None else None,
            )
            self._timing["results_s"] = time.monotonic() - self.started
        finally:
            await self._close()
            records = [r for r in self.backend.task_records(self.job_id) if r.get("job_id") == self.job_id]
            run.tasks = sorted(records, key=lambda r: float(r.get("received_at", 0.0)))
            run.timing = self._finish_timing(run)

    def _finish_timing(self, run: Run) -> dict[str, float]:
        t = dict(self._timing)
        t["wall_s"] = time.monotonic() - self.started
        if run.tasks:
            t["train_s"] = sum(float(r.get("train_s", 0.0)) for r in run.tasks)
            t["busy_s"] = busy_seconds(run.tasks)
            t["overhead_s"] = t["wall_s"] - t["busy_s"]
        return {k: round(v, 3) for k, v in t.items()}

    async def _close(self) -> None:
        if self.admin is not None:
            with contextlib.suppress(Exception):
                await self.admin.__aexit__()
            self.admin = None
        try:
            await asyncio.wait_for(self.backend.stop(), 60.0)
        except (TimeoutError, FedbusError, OSError) as exc:
            log.warning("environment did not stop cleanly: killing it", reason=str(exc))
            self.backend.kill()
        if self.ctx is not None:
            self.ctx.destroy(linger=0)
            self.ctx = None

    async def _abort(self) -> None:
        try:
            if self.admin is not None and self.job_id:
                await self.admin.abort(self.job_id)
        finally:
            if self._wake is not None:
                self._wake.set()

    def _publish(self, p: Progress) -> None:
        """Hand a snapshot to ``wait()``: when something changed, or a second went by (time-based bars)."""
        with self._cond:
            old = self._snapshot
            if (
                old is not None
                and dataclasses.replace(old, elapsed_s=p.elapsed_s) == p
                and p.elapsed_s < old.elapsed_s + 1
            ):
                return
            self._snapshot, self._seq = p, self._seq + 1
            self._cond.notify_all()

    # --- from the caller's thread ----------------------------------------------------------------------

    def begin(self, run: Run) -> None:
        self.future = self.loop.submit(self.follow(run))
        self.future.add_done_callback(self._ended)

    def _ended(self, _: concurrent.futures.Future[None]) -> None:
        with self._cond:
            self._cond.notify_all()
        self.loop.stop(join_s=0)

    def wait(self, timeout: float | None) -> None:
        assert self.future is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                with self._cond:
                    left = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
                    self._cond.wait_for(lambda: self._seq != self._seen or self.future.done(), left)  # type: ignore[union-attr]
                    snap, seq = self._snapshot, self._seq
                if seq != self._seen and snap is not None and self.reporter is not None:
                    self._seen = seq
                    self.reporter.update(snap)
                self._seen = seq
                if self.future.done():
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {self.job_id} still running after {timeout:g} s")
            self.future.result()
            if self.reporter is not None:
                self.reporter.close()
        except TimeoutError:
            raise
        except BaseException:
            if self.reporter is not None:
                self.reporter.close()
            self.interrupt()
            raise

    def abort(self) -> None:
        if self.future is not None and not self.future.done():
            with contextlib.suppress(FedbusError, RuntimeError, TimeoutError):
                self.loop.call(self._abort(), timeout=10.0)

    def interrupt(self) -> None:
        """The caller stopped waiting abnormally: abort the job, stop the environment, make sure of it."""
        log.warning("run interrupted: aborting the job and stopping the environment", job_id=self.job_id)
        self._interrupted = True
        if self.future is not None and not self.future.done():
            with contextlib.suppress(Exception):
                self.loop.call(self._abort(), timeout=5.0)  # also wakes follow, which stops the backend
            concurrent.futures.wait([self.future], timeout=60.0)
        self.shutdown_now()

    def shutdown_now(self) -> None:
        """Stop the backend if nothing else will, kill what is left, end the loop; safe to call twice."""
        if self.future is None and self.loop.thread.is_alive():  # start failed: follow never ran
            with contextlib.suppress(Exception):
                self.loop.call(self._close(), timeout=60.0)
        self.backend.kill()
        self.loop.stop()
