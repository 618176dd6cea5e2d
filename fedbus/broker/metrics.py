"""What the broker shows while it runs: Prometheus text-format metrics over a small HTTP server, and
per-job TensorBoard event files when tensorboard is installed.

Theory of operation. Counters live in ``Metrics`` and are bumped where things happen: every message in
or out (``CountingEndpoint`` wraps the broker's endpoint, so the stream hub's chunks are counted too),
every finished model stream, every action a job's strategy takes (accepted / refused updates, new
versions, staleness). Gauges (sites connected, jobs by state, each running job's version) are read from
the broker at scrape time, so they can never drift from the truth. ``MetricsServer`` answers
``GET /metrics`` with ``render(broker)``; requests are untrusted like everything else: bounded in size
and time, anything else answered 400/404/405 and logged, and the server keeps serving. The HTTP port is
off unless ``metrics_port`` is set; it binds ``metrics_host`` (127.0.0.1 by default).

Labels stay bounded: message types are the protocol's known ones, update refusal reasons are mapped to
a short fixed list (``reason_class``), and the ``job`` label grows by one per submitted job.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedbus.broker.faults import Faults
from fedbus.broker.store import ACTIVE_STATES, FINAL_STATES
from fedbus.log import get_logger
from fedbus.protocol.messages import Message
from fedbus.strategy import Accepted, Action, Publish, Rejected
from fedbus.transport.endpoint import Incoming

if TYPE_CHECKING:
    from fedbus.broker.tracking import Tracking

log = get_logger("broker.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST = 8192
"""Largest request head (request line and headers) the metrics server reads."""
READ_TIMEOUT_S = 5.0
STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32)
PEER_ROWS = 20
"""Peers listed by name in per-peer families (the ones with the most): a label per made-up routing id would not
stay bounded."""

# Update refusal reasons (free text from strategies and the controller) -> a bounded label value.
# First match wins; the keys are substrings of the reasons those modules write.
_REASON_CLASSES: tuple[tuple[str, str], ...] = (
    ("stale", "stale"),
    ("non-finite", "non_finite"),
    ("mismatch for", "shape_or_dtype"),
    ("missing tensors", "wrong_tensors"),
    ("unexpected tensors", "wrong_tensors"),
    ("not a tensor", "wrong_tensors"),
    ("dense tensor", "wrong_tensors"),
    ("base_version", "version_mismatch"),
    ("weight must", "bad_weight"),
    ("params", "bad_params"),
    ("upload failed", "upload_failed"),
    ("download failed", "download_failed"),
    ("script crashed", "script_crashed"),
    ("not connected", "site_disconnected"),
    ("timeout", "timeout"),
    ("deadline", "timeout"),
)


def reason_class(reason: str) -> str:
    """A refusal reason mapped to one of a few label values (``other`` when none fits)."""
    low = reason.lower()
    return next((label for key, label in _REASON_CLASSES if key in low), "other")


def _nbytes(frame: Any) -> int:
    n = getattr(frame, "nbytes", None)
    return int(n) if n is not None else len(frame)


class Metrics:
    """The broker's counters. Pure bookkeeping: no IO (the TensorBoard writer is an optional extra)."""

    def __init__(self, board_dir: Callable[[str], Path] | None = None) -> None:
        self.started = time.time()
        self.messages: Counter[tuple[str, str]] = Counter()  # (direction, type) -> count
        self.bytes: Counter[str] = Counter()  # direction -> payload bytes
        self.streams: Counter[tuple[str, str]] = Counter()  # (direction, outcome) -> count
        self.stream_bytes: Counter[str] = Counter()
        self.stream_seconds: defaultdict[str, float] = defaultdict(float)
        self.updates: Counter[tuple[str, str, str]] = Counter()  # (job, outcome, reason class) -> count
        self.versions: Counter[str] = Counter()  # job -> versions published
        self.staleness: dict[str, list[int]] = {}  # job -> per-bucket counts, the last one +Inf
        self.staleness_sum: Counter[str] = Counter()
        self._since_version: dict[str, list[int]] = {}  # job -> [staleness sum, count, max] since its last version
        self.boards = BoardWriters(board_dir) if board_dir is not None else None
        self.tracking: Tracking | None = None
        """The broker's per-job tracking sinks (``fedbus.broker.tracking``): told of each version and job end."""

    # --- bumped by the broker --------------------------------------------------------------------------------

    def message(self, direction: str, msg_type: str, payload: Iterable[Any]) -> None:
        self.messages[(direction, msg_type)] += 1
        self.bytes[direction] += sum(_nbytes(f) for f in payload)

    def stream_done(self, direction: str, nbytes: int, seconds: float, ok: bool) -> None:
        self.streams[(direction, "ok" if ok else "failed")] += 1
        if ok:
            self.stream_bytes[direction] += nbytes
            self.stream_seconds[direction] += seconds

    def track_incoming(self, total: int, result: asyncio.Future) -> None:
        """Count an incoming stream when its result settles (whoever awaits it)."""
        start = time.monotonic()

        def done(fut: asyncio.Future) -> None:
            ok = not fut.cancelled() and fut.exception() is None
            self.stream_done("in", total, time.monotonic() - start, ok)

        result.add_done_callback(done)

    def on_action(self, job: str, action: Action) -> None:
        """One action of a job's strategy, as the controller executes it."""
        if isinstance(action, Accepted):
            self.updates[(job, "accepted", "")] += 1
            s = max(0, int(action.staleness or 0))
            hist = self.staleness.setdefault(job, [0] * (len(STALENESS_BUCKETS) + 1))
            hist[next((i for i, b in enumerate(STALENESS_BUCKETS) if s <= b), len(STALENESS_BUCKETS))] += 1
            self.staleness_sum[job] += s
            since = self._since_version.setdefault(job, [0, 0, 0])
            since[0], since[1], since[2] = since[0] + s, since[1] + 1, max(since[2], s)
        elif isinstance(action, Rejected):
            self.refused(job, action.reason)
        elif isinstance(action, Publish):
            self.versions[job] += 1
            if self.tracking is not None:
                self.tracking.published(job, action.version, action.model, action.metrics)
            folded = self._since_version.pop(job, None)  # [staleness sum, count, max] of the version's updates
            if self.boards is not None:
                self.boards.version(job, action.version, action.metrics)
                if folded is not None:
                    # Per version, not per update: a point per update loads the broker's TensorBoard writer at
                    # hundreds of updates a second, for a curve nobody can read.
                    self.boards.scalar(job, "fedbus/staleness", folded[0] / folded[1], action.version)
                    self.boards.scalar(job, "fedbus/staleness_max", folded[2], action.version)

    def refused(self, job: str, reason: str) -> None:
        """An update that did not go into the aggregate (refused by the strategy, or its task failed)."""
        self.updates[(job, "refused", reason_class(reason))] += 1

    def job_ended(self, job: str) -> None:
        """The job is final (finished, failed or aborted): its TensorBoard writer is flushed and closed."""
        self._since_version.pop(job, None)  # updates folded into no version: nothing left to plot them at
        boards = self.boards
        if boards is None:
            return
        # sites' records may still be queued for the job's board: its tracking thread closes it after them
        if self.tracking is None or not self.tracking.job_ended(job, then=lambda: boards.close(job)):
            boards.close(job)

    def close(self) -> None:
        if self.tracking is not None:
            self.tracking.close()
        if self.boards is not None:
            self.boards.close_all()


class CountingEndpoint:
    """The broker's endpoint, counting every message and its payload bytes on the way through."""

    def __init__(self, inner: Any, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    @property
    def address(self) -> str:
        return self.inner.address

    async def send(self, peer: bytes, msg: Message, payload: Sequence[Any] = ()) -> None:
        await self.inner.send(peer, msg, payload)
        self.metrics.message("out", msg.TYPE, payload)

    def backlogged(self) -> bool:
        return self.inner.backlogged()

    @property
    def drained_at(self) -> float:
        return self.inner.drained_at

    async def recv(self) -> Incoming:
        inc = await self.inner.recv()
        self.metrics.message("in", inc.msg.TYPE, inc.payload)
        return inc

    def close(self) -> None:
        self.inner.close()


# --- the text format ---------------------------------------------------------------------------------------


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


Row = tuple[float, dict[str, str]]  # (value, labels)


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, rows: Iterable[Row] = ()) -> None:
        """One metric family: its HELP and TYPE lines, then its samples (they must not be interleaved)."""
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for value, labels in rows:
            self.sample(name, value, labels)

    def sample(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        body = ",".join(f'{k}="{_label(str(v))}"' for k, v in (labels or {}).items())
        text = _number(value)
        self.lines.append(f"{name}{{{body}}} {text}" if body else f"{name} {text}")


def _number(value: float) -> str:
    """Exact: an int as is (a byte counter keeps every digit), a float as its shortest round-trip repr."""
    if isinstance(value, int):
        return str(int(value))  # int(): a bool prints as 0 or 1
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _per_direction(values: Any, scale: Callable[[float], float] | None = None) -> list[Row]:
    return [(values[d] if scale is None else scale(values[d]), {"direction": d}) for d in ("in", "out")]


def render(metrics: Metrics, broker: Any) -> str:
    """The Prometheus text exposition of ``metrics`` plus gauges read from ``broker`` now."""
    t = _Text()
    m = metrics
    up = round(time.time() - m.started, 3)
    t.family("fedbus_up_seconds", "gauge", "Seconds since the broker started.", [(up, {})])
    t.family(
        "fedbus_sites_connected",
        "gauge",
        "Sites online now (said hello, not silent past liveness).",
        [(len(broker.registry.online()), {})],
    )
    t.family(
        "fedbus_sites_known",
        "gauge",
        "Sites seen since the broker started, online or not.",
        [(len(broker.registry.sites), {})],
    )
    faults: Faults = broker.store.faults
    now = time.time()
    t.family(
        "fedbus_workspace_writable",
        "gauge",
        "1 while every write to the workspace succeeds; 0 while one is failing and being retried.",
        [(0 if faults else 1, {})],
    )
    t.family(
        "fedbus_workspace_faults",
        "gauge",
        "Writes to the workspace failing now, by what and errno; the value is seconds since the first failure.",
        [(round(now - f.since, 3), {"what": f.what.split(" of ")[0], "errno": f.errno_name}) for f in faults.active()],
    )
    t.family(
        "fedbus_workspace_write_failures_total",
        "counter",
        "Failed attempts to write the workspace (each retry that fails counts).",
        [(faults.failures, {})],
    )
    counts = broker.store.count_by_state()
    states = [(counts.get(s, 0), {"state": s}) for s in (*ACTIVE_STATES, *FINAL_STATES)]
    t.family("fedbus_jobs", "gauge", "Jobs in the store, by state.", states)
    running = sorted(broker.controllers.items())
    t.family(
        "fedbus_job_version",
        "gauge",
        "Global model version of each running job.",
        [(c.strategy.version, {"job": j}) for j, c in running],
    )
    t.family(
        "fedbus_job_tasks_in_flight",
        "gauge",
        "Tasks dispatched and not yet answered, per running job.",
        [(len(c.streams.tasks), {"job": j}) for j, c in running],
    )
    t.family(
        "fedbus_versions_published_total",
        "counter",
        "Global model versions (rounds) published, per job.",
        [(n, {"job": j}) for j, n in sorted(m.versions.items())],
    )
    t.family(
        "fedbus_updates_total",
        "counter",
        "Site updates accepted into an aggregate or refused, by reason.",
        [(n, {"job": j, "outcome": o, "reason": r}) for (j, o, r), n in sorted(m.updates.items())],
    )
    t.family("fedbus_update_staleness", "histogram", "Staleness (versions behind) of accepted updates.")
    for job_id, hist in sorted(m.staleness.items()):
        cumulative = 0
        for bound, n in zip((*map(str, STALENESS_BUCKETS), "+Inf"), hist, strict=True):
            cumulative += n
            t.sample("fedbus_update_staleness_bucket", cumulative, {"job": job_id, "le": bound})
        t.sample("fedbus_update_staleness_sum", m.staleness_sum[job_id], {"job": job_id})
        t.sample("fedbus_update_staleness_count", cumulative, {"job": job_id})
    t.family(
        "fedbus_messages_total",
        "counter",
        "Messages received (in) and sent (out), by type.",
        [(n, {"direction": d, "type": ty}) for (d, ty), n in sorted(m.messages.items())],
    )
    t.family(
        "fedbus_payload_bytes_total",
        "counter",
        "Payload bytes (model chunks, job archives) in and out.",
        _per_direction(m.bytes),
    )
    t.family(
        "fedbus_streams_total",
        "counter",
        "Model streams ended, by direction and outcome.",
        [(n, {"direction": d, "outcome": o}) for (d, o), n in sorted(m.streams.items())],
    )
    t.family(
        "fedbus_stream_bytes_total", "counter", "Bytes of completed model streams.", _per_direction(m.stream_bytes)
    )
    t.family(
        "fedbus_stream_seconds_total",
        "counter",
        "Seconds spent on completed model streams.",
        _per_direction(m.stream_seconds, lambda v: round(v, 6)),
    )
    rates = {d: m.stream_bytes[d] / m.stream_seconds[d] if m.stream_seconds[d] > 0 else 0.0 for d in ("in", "out")}
    t.family(
        "fedbus_stream_throughput_bytes_per_second",
        "gauge",
        "Mean throughput of completed streams (bytes/seconds).",
        _per_direction(rates, lambda v: round(v, 1)),
    )
    _hostile_peers(t, broker)
    return "\n".join(t.lines) + "\n"


def _hostile_peers(t: _Text, broker: Any) -> None:
    """What the broker refused and dropped (``fedbus.broker.meter``, ``fedbus.transport.overflow``)."""
    meter, router = getattr(broker, "meter", None), getattr(broker, "router", None)
    if meter is None:
        return
    refusals = meter.refusals
    t.family(
        "fedbus_refused_messages_total",
        "counter",
        "Inbound messages refused, by code (rate_limited: over the peer's budget; see docs/security.md).",
        [(n, {"code": c}) for c, n in sorted(refusals.total.items())],
    )
    t.family(
        "fedbus_refusal_bursts_total",
        "counter",
        "Bursts of refusals (each logged and audited once, with its count), by code.",
        [(n, {"code": c}) for c, n in sorted(refusals.bursts.items())],
    )
    lim = meter.limits
    t.family(
        "fedbus_over_budget_total",
        "counter",
        "Inbound messages dropped over the peer's budget, by the budget that ran out (messages or bytes).",
        [(n, {"budget": b}) for b, n in sorted(lim.refused_by.items())],
    )
    t.family("fedbus_stream_messages_unmetered_total", "counter", "Messages of open streams (credit-bounded).")
    t.sample("fedbus_stream_messages_unmetered_total", lim.free)
    uploads = getattr(broker, "uploads", None)
    if uploads is not None:
        t.family(
            "fedbus_uploads_stalled_total",
            "counter",
            "Big uploads aborted for stalling while another waited for their slot (upload_stall_s).",
        )
        t.sample("fedbus_uploads_stalled_total", uploads.slots.taken_total)
    if router is None:
        return
    o = router.overflow
    t.family("fedbus_send_dropped_total", "counter", "Messages dropped because the peer's queue was full.")
    t.sample("fedbus_send_dropped_total", o.dropped_total)
    top = sorted(o.dropped.items(), key=lambda kv: -kv[1])[:PEER_ROWS]
    t.family(
        "fedbus_peer_send_dropped_total",
        "counter",
        f"Messages dropped because the peer's queue was full, per peer (the {PEER_ROWS} with most drops).",
        [(n, {"peer": p.decode("ascii", "replace") if p.isascii() else p.hex()}) for p, n in top],
    )
    t.family(
        "fedbus_peers_cut_off_total",
        "counter",
        "Peers cut off: their queue stayed full, or they flooded refused messages.",
    )
    t.sample("fedbus_peers_cut_off_total", o.cut_off_total)
    t.family("fedbus_peers_cut_off", "gauge", "Peers cut off now (cooling down).")
    t.sample("fedbus_peers_cut_off", o.cut_off_now(time.monotonic()))
    t.family("fedbus_cut_off_messages_total", "counter", "Messages to or from cut-off peers, dropped unread.")
    t.sample("fedbus_cut_off_messages_total", o.ignored_total)


# --- the HTTP server -----------------------------------------------------------------------------------------

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Too Large",
    503: "Service Unavailable",
}


def health(faults: Faults, now: float) -> tuple[bool, str]:
    """``/healthz``: healthy unless a write to the workspace is failing (``fedbus.broker.faults``); the body
    names each failing write (what, where, the errno, since when)."""
    active = faults.active()
    if not active:
        return True, "ok\n"
    return False, "".join(f"{f.describe(now)}\n" for f in active)


class MetricsServer:
    """``GET /metrics`` (Prometheus text format) and ``GET /healthz``, one request per connection."""

    def __init__(
        self, page: Callable[[], str], host: str, port: int, health: Callable[[], tuple[bool, str]] | None = None
    ) -> None:
        self.page = page
        self.health = health  # (healthy, body) for /healthz; None: always healthy
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_REQUEST)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics listening", url=f"http://{self.host}:{self.port}/metrics")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(writer.get_extra_info("peername"))
        try:
            status, body = await self._answer(reader, peer)
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + body)
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            log.debug("metrics connection dropped", peer=peer, reason=str(exc) or type(exc).__name__)
        except Exception:  # a bug must cost one scrape, never the broker
            log.exception("metrics request failed", peer=peer)
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _answer(self, reader: asyncio.StreamReader, peer: str) -> tuple[int, bytes]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            return self._refuse(431, peer, f"request head over {MAX_REQUEST} bytes")
        except asyncio.IncompleteReadError:
            return self._refuse(400, peer, "connection closed before the request ended")
        except TimeoutError:
            return self._refuse(400, peer, f"no complete request within {READ_TIMEOUT_S:g} s")
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return self._refuse(400, peer, f"not an HTTP/1.x request line: {parts[0][:40]!r}")
        method, path = parts[0], parts[1].split("?", 1)[0]
        if method != "GET":
            return self._refuse(405, peer, f"method {method[:16]!r}")
        if path == "/metrics":
            return 200, self.page().encode("utf-8")
        if path == "/healthz":
            healthy, body = (True, "ok\n") if self.health is None else self.health()
            return (200 if healthy else 503), body.encode("utf-8")
        return self._refuse(404, peer, f"no page {path[:80]!r}")

    @staticmethod
    def _refuse(status: int, peer: str, reason: str) -> tuple[int, bytes]:
        log.warning("metrics request refused", peer=peer, status=status, reason=reason)
        return status, f"{status} {_REASONS[status]}: {reason}\n".encode()


# --- TensorBoard -----------------------------------------------------------------------------------------------


def tensorboard_available() -> bool:
    """True when torch's SummaryWriter can be used (it needs the ``tensorboard`` package)."""
    return importlib.util.find_spec("tensorboard") is not None


def _import_summary_writer() -> None:
    import torch.utils.tensorboard  # noqa: F401  (the import is the point)


class BoardWriters:
    """One TensorBoard ``SummaryWriter`` per job, in ``board_dir(job)``; a no-op without tensorboard.

    Scalars: every numeric metric of each published version (step = version), the staleness of the updates
    in it among them. SummaryWriter writes from its own thread.

    Importing ``torch.utils.tensorboard`` takes about a second of CPU. Done where the first version is
    published, it would hold the broker's event loop that long; it is started in a thread of its own at
    construction instead, so the loop only waits for what is left of it.
    """

    def __init__(self, board_dir: Callable[[str], Path]) -> None:
        self.board_dir = board_dir
        self.enabled = tensorboard_available()
        self._writers: dict[str, Any] = {}
        self._lock = threading.Lock()  # the event loop (versions) and tracking threads (sites' records) write
        if self.enabled:
            threading.Thread(target=_import_summary_writer, name="fedbus-tensorboard-import", daemon=True).start()

    def _writer(self, job: str) -> Any:
        w = self._writers.get(job)
        if w is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            with self._lock:
                w = self._writers.get(job)
                if w is None:
                    w = self._writers[job] = SummaryWriter(log_dir=str(self.board_dir(job)), flush_secs=5)
        return w

    def scalar(self, job: str, tag: str, value: float, step: int) -> None:
        w = self._writer(job)
        if w is not None:
            w.add_scalar(tag, value, step)

    def text(self, job: str, tag: str, text: str, step: int) -> None:
        w = self._writer(job)
        if w is not None:
            w.add_text(tag, text, step)

    def version(self, job: str, version: int, metrics: Any) -> None:
        w = self._writer(job)
        if w is None:
            return
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                w.add_scalar(key, value, version)

    def close(self, job: str) -> None:
        with self._lock:
            w = self._writers.pop(job, None)
        if w is not None:
            w.close()

    def close_all(self) -> None:
        for job in list(self._writers):
            self.close(job)
