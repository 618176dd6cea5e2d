"""One deployed job at a site: its folder, its training script, and the relay between script and broker.

Theory of operation. ``folder.prepare()`` makes the job's folder (``jobs/JOB/{files,inbox,outbox}``) at
once, so a model stream that follows the deploy immediately has somewhere to land; ``run`` unpacks the archive,
binds the local link (``ipc://jobs/JOB/link.sock``, mode 0600, plus a per-job token the script must
present), starts the script and waits for it to end, reporting ``started`` and ``exited``/``crashed``.

A task is relayed in three steps: the broker's ``task`` is remembered (``on_task``); its model stream is
accepted into ``inbox/TASK.safetensors`` (``accept_offer``, refused for any task we were not told
about); when the stream completes the task is *ready*: sent to the script with its ``path``, or
queued until the script has said hello. A task's time limit runs from ready to result, restarted when the
task reaches the script (a script still importing torch under load is not yet late). The script's
``result`` names ``outbox/TASK.safetensors`` in its ``path``; the site reads it, applies its privacy filters, sends the
broker ``result(sid)`` first and then the stream (the broker pairs them by sid), and answers the script
``reply(ok)`` once the broker acknowledged the upload. Everything the script says is untrusted too: a
wrong token, an unknown task or a path outside the outbox is refused and logged.

With ``[client] log_streaming`` the script's output (its ``script.log``) is relayed to the broker as it grows
(``log_relay.LogRelay``); its last lines go before the broker hears that the script ended.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import secrets
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedbus.config import is_safe_name
from fedbus.daemon import answer_messages
from fedbus.errors import FedbusError, JobError, RemoteProtocolError, TransportError
from fedbus.jobs import unpack_job
from fedbus.modelio import serde
from fedbus.modelio.sinks import BufferSink
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.messages import (
    Bye,
    Deploy,
    EndJob,
    Error,
    Hello,
    JobEvent,
    Message,
    Offer,
    Reply,
    Result,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
    Task,
    Welcome,
)
from fedbus.site.child import Launcher, Script, ScriptProcess
from fedbus.site.filters import (
    Filter,
    FilterContext,
    HEEncrypt,
    PrivacyFilter,
    SecAggMask,
    apply_filters,
    filter_metrics,
    filter_name,
    he_filter,
    job_filters,
)
from fedbus.site.folder import JobFolder, script_env
from fedbus.site.log_relay import MAX_BEHIND, LogRelay
from fedbus.site.secagg import SiteSecAgg
from fedbus.site.uplink import BrokerBus
from fedbus.site.uploads import PendingUploads
from fedbus.transport.context import Context
from fedbus.transport.endpoint import Incoming, RouterEndpoint

KINDS = ("train", "evaluate", "submit_model")
UPLOAD_KINDS = ("train", "submit_model")
"""Task kinds whose result carries params: a trained model, or the site's local model for cross-site evaluation."""


@dataclass(frozen=True)
class RunnerSettings:
    """The site-wide values every runner needs (from SiteConfig and the Site's keyword options)."""

    site_name: str
    python: str
    task_timeout_s: float | None = None
    end_grace_s: float = 10.0
    kill_after_s: float = 5.0
    max_model_bytes: int = 16 << 30
    launcher: Launcher = ScriptProcess
    """How the script is started: a child process; the simulator (SimEnv) runs it in a thread instead."""
    speed_factor: float | None = None
    """Simulation only: hold each result back so the task takes ``factor x`` the script's training time."""
    observer: Callable[[dict[str, Any]], None] | None = None
    """Simulation only: called with each relayed result's timing record (what the "result delivered" log says)."""
    he_context: str | None = None
    """The site's secret CKKS context file: jobs with homomorphic encryption need it (``filters.he_filter``)."""


@dataclass
class _Ready:
    """A task whose model is in the inbox: queued for, or delivered to, the script."""

    task: Task
    path: Path | None
    timer: asyncio.TimerHandle | None = None
    uploading: bool = False
    delivered_at: float = 0.0


class JobRunner:
    """Runs one job's script and relays its tasks and results; ``done`` is set when it is over."""

    def __init__(
        self,
        deploy: Deploy,
        *,
        root: Path,
        settings: RunnerSettings,
        bus: BrokerBus,
        ctx: Context,
        filters: Sequence[Filter] = (),
        log: Any,
        audit: Any = None,
    ) -> None:
        self.deploy = deploy
        self.job_id = deploy.job_id
        self.folder = JobFolder(root)
        self.uploads = PendingUploads(root, max_total=settings.max_model_bytes)
        self.settings = settings
        self.bus = bus
        self.ctx = ctx
        self.filters = list(filters)  # the site's own: they always run, after the job's (job_filters)
        self.job_filters: list[Filter] = []
        self.he: HEEncrypt | None = None  # the job's encryption: the last filter, and the decryption of its models
        self.audit = audit
        self.log = log.bind(job=deploy.job_id)
        self.token = secrets.token_urlsafe(24)
        self.task_timeout = _min_positive(settings.task_timeout_s, deploy.config.get("task_timeout_s"))
        self.done = asyncio.Event()
        self.proc: Script | None = None
        self.link: RouterEndpoint | None = None
        self._script: bytes | None = None  # the routing id of the script that presented the token
        self._expected: dict[str, Task] = {}  # tasks whose model stream has not arrived yet
        self._ready: dict[str, _Ready] = {}
        self._queue: list[str] = []  # ready task ids waiting for the script's hello
        self._stopping = False
        self._report = True  # whether the script's end is reported to the broker
        self._crash: str | None = None
        self._tasks: set[asyncio.Task] = set()
        self._log_relay: LogRelay | None = None
        self.secagg = SiteSecAgg(settings.site_name, deploy.job_id, bus.send, self.log)

    # --- lifecycle ----------------------------------------------------------------------------------

    async def run(self, archive: bytes) -> None:
        """Deploy, run the script until it exits, report what happened; always ends with ``done`` set."""
        try:
            try:
                await self._start(archive)
            except (FedbusError, OSError) as exc:
                if not self._stopping:
                    self.log.warning("deploy failed", reason=str(exc))
                    self.bus.report(JobEvent(self.job_id, "crashed", code=-1, detail=f"deploy failed: {exc}"[:4000]))
                return
            assert self.proc is not None
            self.bus.report(JobEvent(self.job_id, "started", data={"pid": self.proc.pid}))
            self._spawn(self._resume_uploads())
            if self._log_relay is not None:
                self._spawn(self._log_relay.run())
            if self._stopping:  # end_job arrived while the script was being started
                await self.proc.stop(0.0, self.settings.kill_after_s)
            code = await self.proc.wait()
            self.proc.signal_group(signal.SIGKILL)  # whatever the script left behind in its group
            if self._log_relay is not None:  # the script's last lines, before the broker hears it ended
                self._log_relay.pump(MAX_BEHIND, final=True)
            self._report_exit(code)
        finally:
            await self._close()
            self.done.set()

    async def _start(self, archive: bytes) -> None:
        folder = self.folder
        spec = await asyncio.to_thread(unpack_job, archive, folder.files, require_model=False, check_strategy=False)
        self.task_timeout = _min_positive(self.task_timeout, spec.task_timeout_s)
        self.job_filters = list(job_filters(spec.extra))
        self.he = he_filter(spec.extra, self.settings.he_context)
        script = folder.script(self.deploy.script)
        if not all(isinstance(a, str) for a in self.deploy.args):
            raise JobError("deploy args must be strings")
        self.link = folder.bind_link(self.ctx)
        self._spawn(self._serve_link())
        if self._stopping:
            raise JobError("the job ended before its script started")
        env = script_env(
            link=self.link.address,
            token=self.token,
            job_id=self.job_id,
            site=self.settings.site_name,
            index=_int(self.deploy.config.get("site_index"), 0),
            count=_int(self.deploy.config.get("num_sites"), 1),
            root=folder.root,
        )
        if self.settings.speed_factor is not None:
            env["FEDBUS_SPEED_FACTOR"] = repr(self.settings.speed_factor)
        if spec.client.get("log_streaming"):  # [client] log_streaming: the output reaches the broker too
            self._log_relay = LogRelay(folder.log_path, self.job_id, self.bus.report)
        self.proc = await self.settings.launcher.start(
            self.settings.python, script, self.deploy.args, cwd=folder.files, env=env, log_path=folder.log_path
        )
        self.log.info("script started", pid=self.proc.pid, script=self.deploy.script)

    def _report_exit(self, code: int) -> None:
        assert self.proc is not None
        if self._crash is not None:
            event, detail = "crashed", f"{self._crash}\n{self.proc.tail()}"
        elif self._stopping or code == 0:
            event, detail = "exited", ""
        else:
            event, detail = "crashed", self.proc.tail()
        self.log.info("script ended", outcome=event, code=code)
        self.folder.drop_held()  # files the script took and still held: no mapping of them is left
        if self._report:
            self.bus.report(JobEvent(self.job_id, event, code=code, detail=detail[-4000:]))

    async def end(self, reason: str, *, report: bool = True, grace: float | None = None) -> None:
        """The broker ended the job: tell the script, give it ``grace`` (default ``end_grace_s``), then SIGTERM,
        then SIGKILL. ``report=False``: the script's end is not reported (a broker that never knew the job takes
        no events)."""
        if self._stopping:
            return
        self._stopping = True
        self._report = report
        self._expected.clear()
        for r in self._ready.values():
            if r.timer is not None:
                r.timer.cancel()
        wait = 0.0
        if self._script is not None:
            await self._to_script(EndJob(self.job_id, reason))
            wait = self.settings.end_grace_s if grace is None else grace
        if self.proc is not None:
            await self.proc.stop(wait, self.settings.kill_after_s)

    @property
    def stopping(self) -> bool:
        """Whether the job is ending here (``end`` or ``kill`` was called)."""
        return self._stopping

    def kill(self) -> None:
        """Stop now, without grace (a forced shutdown)."""
        self._stopping = True
        if self.proc is not None:
            self.proc.kill()

    async def _close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for r in self._ready.values():
            if r.timer is not None:
                r.timer.cancel()
        if self.link is not None:
            self.link.close()
        self.folder.remove_link()

    # --- broker -> script ---------------------------------------------------------------------------

    async def on_task(self, task: Task) -> str | None:
        """Take a task from the broker; returns why it is refused, or None."""
        if self._stopping or self.done.is_set():
            return "the job is ending at this site"
        if not is_safe_name(task.task_id):
            return f"task id {task.task_id[:80]!r} is not a safe name"
        if task.kind not in KINDS:
            return f"unknown task kind {task.kind[:32]!r}"
        if task.task_id in self._expected or task.task_id in self._ready:
            return f"task {task.task_id} is already here"
        if self.secagg.wanted(task):  # keys advertised now: the round's setup runs while the script trains
            try:
                await self.secagg.on_task(task)
            except (FedbusError, OSError) as exc:
                return f"secure aggregation: {exc}"
        if task.sid is None:
            await self._make_ready(task, None)
        else:
            self._expected[task.task_id] = task
        return None

    async def on_secagg(self, msg: SecAggRoster | SecAggShares | SecAggUnmask) -> None:
        """A secure-aggregation step from the broker (``fedbus.site.secagg``)."""
        await self.secagg.on_message(msg)

    def accept_offer(self, offer: Offer) -> BufferSink | None:
        """A model stream from the broker: accepted into the inbox only for a task announced before it."""
        task_id = offer.route.get("task_id")
        task = self._expected.get(task_id) if isinstance(task_id, str) else None
        if task is None or task.sid != offer.sid or self._stopping:
            return None
        del self._expected[task.task_id]
        path = self.folder.take_inbox_file(task.task_id)
        # Written through a shared mapping of the file. Positional writes (SpoolSink, pwritev) cost less CPU but
        # can stall a site's loop past its liveness window under writeback (docs/benchmarks.md).
        sink = BufferSink(max_total=self.settings.max_model_bytes, path=str(path), tensors=False)
        self._spawn(self._await_model(task, sink, path))
        return sink

    async def _await_model(self, task: Task, sink: BufferSink, path: Path) -> None:
        try:
            await sink.result  # the file is the model: the script reads it itself
            self._audit("task_received", task=task.task_id, version=task.version, size=sink.offer and sink.offer.total)
            if self.he is not None:  # an encrypted global model: the script gets it decrypted
                await asyncio.to_thread(self.he.decrypt_file, path, self.settings.max_model_bytes)
        except FedbusError as exc:
            self.log.warning("model stream failed", task_id=task.task_id, reason=str(exc))
            path.unlink(missing_ok=True)
            return
        await self._make_ready(task, path)

    async def _make_ready(self, task: Task, path: Path | None) -> None:
        ready = _Ready(task, path)
        self._ready[task.task_id] = ready
        if self.task_timeout is not None:
            loop = asyncio.get_running_loop()
            ready.timer = loop.call_later(self.task_timeout, self._timed_out, task.task_id)
        if self._script is None:
            self._queue.append(task.task_id)
        else:
            await self._deliver(ready)

    async def _deliver(self, ready: _Ready) -> None:
        t = ready.task
        # Only the site names files to the script. The script may take the file (map it, train it or a DIFF into
        # it, send it back as it is) unless the site reads it again at upload: the base a privacy filter works on.
        path = str(ready.path) if ready.path is not None else None
        take = path is not None and not any(isinstance(f, PrivacyFilter) for f in (*self.job_filters, *self.filters))
        ready.delivered_at = time.monotonic()
        if ready.timer is not None:  # the clock restarts at delivery: a script slow to start is not yet late
            ready.timer.cancel()
            ready.timer = asyncio.get_running_loop().call_later(self.task_timeout or 0, self._timed_out, t.task_id)
        await self._to_script(replace(t, sid=None, params_type=self._params_type(t), path=path, take=take))
        self.log.info("task handed to the script", task_id=t.task_id, round=t.round, kind=t.kind, version=t.version)

    def _params_type(self, task: Task) -> str:
        """What the strategy wants back: the task's word, else the deploy config's, else FULL."""
        for value in (task.params_type, self.deploy.config.get("params_type")):
            if value in ("FULL", "DIFF"):
                return str(value)
        return "FULL"

    def _timed_out(self, task_id: str) -> None:
        if self.proc is None or self._stopping or task_id not in self._ready:
            return
        self._crash = f"task {task_id} exceeded the task time limit of {self.task_timeout:g} s"
        self.log.warning("task timed out: killing the script", task_id=task_id)
        self.proc.kill()

    # --- script -> site -----------------------------------------------------------------------------

    async def _serve_link(self) -> None:
        assert self.link is not None
        await answer_messages(self.link, self._on_script, self._refuse)

    async def _refuse(self, peer: bytes, inc: Incoming | None, exc: Exception) -> None:
        """A message from the script that could not be decoded, or that its handler refused: answered, logged."""
        if inc is None:
            self.log.warning("invalid message from the script", peer=peer.hex(), reason=str(exc))
            await self._send_to(peer, Error("bad_message", str(exc)[:500]))
        else:
            self.log.warning("script message refused", type=inc.msg.TYPE, reason=str(exc))
            await self._send_to(peer, Error("refused", str(exc)[:500], inc.msg.TYPE))

    async def _on_script(self, inc: Incoming) -> None:
        msg = inc.msg
        if isinstance(msg, Hello):
            await self._hello(inc.peer, msg)
        elif inc.peer != self._script:
            self.log.warning("message from an unknown link peer", peer=inc.peer.hex(), type=msg.TYPE)
            await self._send_to(inc.peer, Error("hello_required", "say hello with the job's token first", msg.TYPE))
        elif isinstance(msg, Result):
            self._spawn(self._relay(msg))
        elif isinstance(msg, JobEvent) and msg.event == "log":
            self.bus.report(JobEvent(self.job_id, "log", data=msg.data))
        elif isinstance(msg, Bye):
            self.log.info("script said bye", reason=msg.reason)
        else:
            raise RemoteProtocolError(f"a training script may not send {msg.TYPE!r}")

    async def _hello(self, peer: bytes, msg: Hello) -> None:
        if msg.role != "client" or not hmac.compare_digest(msg.session.encode(), self.token.encode()):
            self.log.warning("script hello refused: wrong role or token", peer=peer.hex(), role=msg.role[:32])
            self._audit("refused", by="local link", type="hello", reason="wrong role or link token")
            await self._send_to(peer, Error("bad_token", "wrong role or link token", "hello"))
            return
        self._script = peer
        await self._to_script(Welcome(session=self.job_id, heartbeat_s=0.0, liveness=0))
        queued, self._queue = self._queue, []
        for task_id in queued:
            if task_id in self._ready:
                await self._deliver(self._ready[task_id])

    async def _relay(self, result: Result) -> None:
        """Upload one result to the broker, then tell the script whether it arrived."""
        ready = self._ready.get(result.task_id)
        if ready is None or ready.uploading or result.job_id != self.job_id:
            await self._to_script(Reply(rid=0, ok=False, error=f"no open task {result.task_id[:80]!r} here"))
            return
        ready.uploading = True
        if ready.timer is not None:
            ready.timer.cancel()
        log = self.log.bind(task_id=result.task_id, round=ready.task.round)
        timing = self._timing(ready, result)
        if timing["sim_delay_s"] > 0:  # a simulated slow site: the result waits before it leaves
            await asyncio.sleep(timing["sim_delay_s"])
        uploaded = 0
        try:
            uploaded = await self._upload(ready, result)
        except TransportError as exc:  # the broker is unreachable or refused it: lost, not the script's fault
            log.warning("update lost on the way to the broker", reason=str(exc))
            reply = Reply(rid=0, ok=False, data={"lost": True}, error=str(exc)[:2000])
        except (FedbusError, OSError) as exc:
            log.warning("result refused", reason=str(exc))
            reply = Reply(rid=0, ok=False, error=str(exc)[:2000])
        else:
            record = {"kind": ready.task.kind, "version": ready.task.version, "params_bytes": uploaded, **timing}
            log.info("result delivered", params_type=result.params_type, weight=result.weight, **record)
            if self.settings.observer is not None:
                self.settings.observer(
                    {"site": self.settings.site_name, "job_id": self.job_id, "task_id": result.task_id, **record}
                )
            reply = Reply(rid=0, ok=True)
        finally:
            del self._ready[result.task_id]
            self.uploads.done(result.task_id)  # first: the result file then has no other link, and is recycled
            self.folder.remove_task_files(result.task_id)
        await self._to_script(reply)

    def _timing(self, ready: _Ready, result: Result) -> dict[str, float]:
        """How long the script worked on the task (``train_s``) and how long a simulated slow site holds
        the result back (``sim_delay_s``). The script's own measure (``receive()`` to ``send()``) is taken
        when it is plausible: it leaves out model loading and, in SimEnv, the wait for a training slot."""
        elapsed = time.monotonic() - ready.delivered_at
        claimed = result.train_s
        train_s = claimed if claimed is not None and 0 <= claimed <= elapsed else elapsed
        factor = self.settings.speed_factor
        delay = max(0.0, (factor - 1.0) * train_s) if factor is not None else 0.0
        return {"train_s": round(train_s, 6), "sim_delay_s": round(delay, 6), "received_at": time.time()}

    async def _upload(self, ready: _Ready, result: Result) -> int:
        """Send the result (and its params, for a train or submit_model task); returns the bytes of params streamed."""
        if result.params_type not in ("FULL", "DIFF"):
            raise RemoteProtocolError(f"params_type must be FULL or DIFF, got {result.params_type[:16]!r}")
        if not math.isfinite(result.weight) or result.weight < 0:
            raise RemoteProtocolError(f"weight must be a finite number >= 0, got {result.weight!r}")
        source = None
        weight = result.weight
        mask: SecAggMask | None = None
        if self.secagg.wanted(ready.task):  # masked once the round's shares are in; the weight travels masked
            if result.path is None:
                raise JobError("secure aggregation: a training result must carry params")
            mask, weight = SecAggMask(await self.secagg.ready(ready.task), result.weight), 1.0
        if ready.task.kind in UPLOAD_KINDS and result.path is not None:
            file = self.folder.result_file(result.path, result.task_id)
            source = await asyncio.to_thread(self._result_source, file, ready, result.params_type, mask)
        sid = secrets.randbits(62) if source is not None else None
        t = ready.task
        # The script's meta goes on untouched; local paths and the script's own timing stay here.
        metrics = {**result.metrics, **filter_metrics(self.filters, t.job_id, t.task_id)}  # privacy/epsilon
        out = Result(t.job_id, t.task_id, t.version, result.params_type, weight, metrics, result.meta, sid)
        if source is not None:  # kept until settled: a site killed mid-upload resumes it (site/uploads.py)
            source = await asyncio.to_thread(self.uploads.keep, out, source)
        await self.bus.send(out)
        if source is not None and sid is not None:
            digest = await self.bus.stream(source, {"job_id": t.job_id, "task_id": t.task_id}, sid)
            filters = [filter_name(f) for f in self._upload_filters(mask)]
            self._audit(
                "update_sent", task=t.task_id, version=t.version, size=source.total, digest=digest, filters=filters
            )
        return source.total if source is not None else 0

    def _result_source(self, file: Path, ready: _Ready, params_type: str, mask: Filter | None = None) -> ModelSource:
        """The script's result as a stream source: straight from the file's page cache when no filter has
        to see the tensors (zero copy), else read, filtered (the job's filters, then the site's, then the job's
        encryption or secure aggregation's ``mask``), laid out again."""
        filters = self._upload_filters(mask)
        if not filters:
            return ModelSource.from_file(file, max_total=self.settings.max_model_bytes)
        if filters == [mask]:  # secure aggregation alone reads the tensors, never writes them: no copy
            params, _ = serde.map_file(file, max_total=self.settings.max_model_bytes)
        else:
            params = serde.read_file(file, max_total=self.settings.max_model_bytes)
        base = None  # the global model this update was trained from: DP and exclusion work on the difference
        if ready.path is not None and any(isinstance(f, PrivacyFilter) for f in (*self.job_filters, *self.filters)):
            base = serde.read_file(ready.path, max_total=self.settings.max_model_bytes)
        ctx = FilterContext(self.job_id, ready.task.task_id, params_type, base)
        return ModelSource.from_state_dict(apply_filters(filters, params, ctx))

    def _upload_filters(self, mask: Filter | None = None) -> list[Filter]:
        """What an update passes before it leaves: the job's filters, the site's, then the job's encryption or
        secure aggregation's ``mask`` (each last: the noise of a privacy filter is added before either)."""
        return [*self.job_filters, *self.filters, *(f for f in (self.he, mask) if f is not None)]

    def _audit(self, kind: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.record(kind, job=self.job_id, site=self.settings.site_name, **fields)

    async def _resume_uploads(self) -> None:
        """Uploads an earlier process of this site began and never settled (it was killed): result, then
        the same stream again; the broker continues from what it verified, or refuses a task it forgot."""
        for result, source in await asyncio.to_thread(self.uploads.pending, self.job_id):
            log = self.log.bind(task_id=result.task_id)
            log.info("resuming an interrupted upload", sid=result.sid, params_bytes=source.total)
            try:
                await self.bus.send(result)
                route = {"job_id": self.job_id, "task_id": result.task_id}
                await self.bus.resume_stream(source, route, result.sid or 0)
            except FedbusError as exc:
                log.warning("interrupted upload lost", reason=str(exc))
            else:
                log.info("interrupted upload delivered", params_bytes=source.total)
            finally:
                self.uploads.done(result.task_id)

    # --- helpers ------------------------------------------------------------------------------------

    async def _to_script(self, msg: Message) -> None:
        if self._script is not None:
            await self._send_to(self._script, msg)

    async def _send_to(self, peer: bytes, msg: Message) -> None:
        if self.link is None:
            return
        try:
            await self.link.send(peer, msg)
        except TransportError as exc:
            self.log.warning("cannot reach the script", type=msg.TYPE, reason=str(exc))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _min_positive(*values: Any) -> float | None:
    ok = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < math.inf]
    return min(ok) if ok else None


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default
