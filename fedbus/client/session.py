"""A training script's session with its site: NVIDIA FLARE's client calls over fedbus's local link.

Theory of operation. The site daemon starts the script with ``FEDBUS_*`` variables naming its link (an
``ipc://`` address), a per-job token and the job's folder. ``init()`` says ``hello`` with the token and
waits for ``welcome``. From then on the site pushes ``task`` messages whose ``path`` is a
``.safetensors`` file it received from the broker; ``is_running()`` blocks until one is queued (True) or
``end_job`` arrives (False); ``receive()`` loads the file into CPU tensors; ``send()`` writes the
script's params to ``outbox/TASK.safetensors``, sends ``result`` and blocks until the site's
``reply``, which comes only once the broker acknowledged the upload. When the site lets the script take
the task's file (``Task.take``), ``receive()`` maps it instead of reading it, and ``send()`` of those
very tensors, trained in place, links the file into the outbox instead of writing one; a DIFF is computed
into the file, which is then the result (``_files``).

One ``ClientSession`` holds all of it; the module-level functions (``fedbus.client.api``) act on one session per
process (what FLARE scripts expect), and tests create sessions directly. A session is not thread-safe: call it from
the thread that trains, as FLARE scripts do. The simulator (``fedbus.recipes.SimEnv``) runs several
sites' scripts as threads of one process: it binds one session to each script thread (``bind_thread``),
and the module-level functions look for a thread's own session before the process's.

``send()`` also tells the site how long the script worked on the task (``Result.train_s``, from ``receive()`` to
``send()``): the simulator's slow-site model and overhead figures are built on it. What the site and the script
act on travels in the messages' own fields; ``FLModel.meta`` is the script's alone and reaches the broker untouched.

Evaluation tasks: the script answers with ``FLModel(metrics={...})``; any params it sets are ignored and
only the metrics travel. ``submit_model`` tasks (cross-site evaluation) carry no model: the script sends its
local weights, as they are. DIFF: a script may send ``params_type=DIFF`` itself; and when the task says the
strategy wants deltas (``Task.params_type == "DIFF"``, e.g. FedBuff, or the job's ``transfer_type`` option) a
FULL model is turned into ``params - received`` here, so the script needs no change.

What the job asks of the client API travels in ``Task.options`` (``fedbus.client.options``): numpy exchange
(``receive()`` hands out numpy arrays sharing the tensors' memory; ``send()`` takes them back, cast to the dtype
that arrived where numpy arithmetic widened them), ``memory_gc_rounds``, FedProx's ``fedprox_mu`` (read by
``fedbus.client.fedprox`` and the Lightning patch) and SCAFFOLD (``fedbus.client.scaffold``: the controls are taken
out of the received params, and their deltas added to the result).
"""

from __future__ import annotations

import gc
import os
import re
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedbus.client._files import TakenFile, load_params, save_params, take_params
from fedbus.client._link import ParentWatch, SiteLink
from fedbus.client.constants import ExchangeFormat, FLMetaKey, TransferType
from fedbus.client.model import (
    NUM_STEPS_CURRENT_ROUND,
    FLModel,
    ParamsType,
    diff_params,
    keep_received_dtypes,
    plain_values,
    to_cpu_params,
    to_numpy_params,
)
from fedbus.client.options import TaskOptions
from fedbus.client.scaffold import ScaffoldState, split_controls
from fedbus.errors import ConfigError, JobError, LocalProtocolError
from fedbus.log import get_logger
from fedbus.protocol.messages import EndJob, Error, Hello, JobEvent, Reply, Result, Task, Welcome

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ENV_VARS = (
    "FEDBUS_LINK",
    "FEDBUS_LINK_TOKEN",
    "FEDBUS_JOB_ID",
    "FEDBUS_SITE_NAME",
    "FEDBUS_SITE_INDEX",
    "FEDBUS_NUM_SITES",
    "FEDBUS_WORKSPACE",
)
SPEED_FACTOR_VAR = "FEDBUS_SPEED_FACTOR"
"""Set by a simulated site only: its slowdown factor, shown in ``system_info()["speed_factor"]``."""
TRAIN, EVALUATE, SUBMIT_MODEL = "train", "evaluate", "submit_model"
"""The task names ``get_task_name()`` returns (FLARE's ``is_train``/``is_evaluate``/``is_submit_model``)."""


def task_name(task: Task) -> str:
    """The task's name as the script sees it: its kind, or ``submit_model`` when its options ask for the model."""
    return SUBMIT_MODEL if task.options.get("submit_model") is True else task.kind


class ClientSession:
    """One training script's conversation with its site: tasks in, results out."""

    def __init__(
        self,
        *,
        link: str,
        token: str,
        job_id: str,
        site_name: str,
        site_index: int = 0,
        num_sites: int = 1,
        workspace: str | os.PathLike[str] = ".",
        link_timeout: float = 30.0,
        watch_parent: bool = False,
        site_pid: int | None = None,
        speed_factor: float | None = None,
    ) -> None:
        self.link_address = link
        self.token = token
        self.job_id = job_id
        self.site_name = site_name
        self.site_index = site_index
        self.num_sites = num_sites
        self.workspace = Path(workspace)
        self.link_timeout = link_timeout
        self.watch_parent = watch_parent
        self.site_pid = site_pid  # watched for its exit with watch_parent (SiteLink)
        self.speed_factor = speed_factor
        self._task_started: float | None = None  # when receive() handed out the current task
        self._logger = get_logger("client", site=site_name, job_id=job_id)
        self._link: SiteLink | None = None
        self._tasks: deque[Task] = deque()
        self._current: Task | None = None
        self._received: dict[str, torch.Tensor] | None = None  # the current task's model, by reference
        self._taken: TakenFile | None = None  # its file, when the site let the script take it
        self._ended = False
        self._watch: ParentWatch | None = None
        self.scaffold = ScaffoldState()  # the site's SCAFFOLD controls, kept across rounds
        self._trained = 0  # training results sent: memory_gc_rounds counts them

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> ClientSession:
        """A session for the variables the site set when it started this script (watching the site's PID)."""
        env = os.environ if environ is None else environ
        missing = [v for v in ENV_VARS if not env.get(v)]
        if missing:
            raise ConfigError(
                f"not started by a fedbus site: {', '.join(missing)} unset "
                "(run the script through a job, or create a ClientSession by hand)"
            )
        try:
            index, count = int(env["FEDBUS_SITE_INDEX"]), int(env["FEDBUS_NUM_SITES"])
            speed = float(env[SPEED_FACTOR_VAR]) if env.get(SPEED_FACTOR_VAR) else None
            site_pid = int(env["FEDBUS_SITE_PID"]) if env.get("FEDBUS_SITE_PID") else None
        except ValueError as exc:
            raise ConfigError(f"FEDBUS_SITE_INDEX, FEDBUS_NUM_SITES, FEDBUS_SITE_PID must be integers: {exc}") from exc
        return cls(
            link=env["FEDBUS_LINK"],
            token=env["FEDBUS_LINK_TOKEN"],
            job_id=env["FEDBUS_JOB_ID"],
            site_name=env["FEDBUS_SITE_NAME"],
            site_index=index,
            num_sites=count,
            workspace=env["FEDBUS_WORKSPACE"],
            **{"watch_parent": True, "site_pid": site_pid, "speed_factor": speed, **kwargs},
        )

    # --- lifecycle -----------------------------------------------------------------------------------

    def init(self) -> None:
        """Connect to the site and say hello; raises JobError if the site refuses or does not answer."""
        if self._link is not None:
            return
        site_pid = self.site_pid if self.watch_parent else None
        link = SiteLink(self.link_address, link_timeout=self.link_timeout, site_pid=site_pid)
        try:
            link.send(Hello(role="client", name=self.site_name, session=self.token, caps={"pid": os.getpid()}))
            while True:
                msg = link.recv(self.link_timeout)
                if msg is None:
                    raise JobError(f"the site at {self.link_address} did not answer hello in {self.link_timeout:g} s")
                if isinstance(msg, Welcome):
                    break
                if isinstance(msg, Error):
                    raise JobError(f"the site refused this script: {msg.code}: {msg.reason}")
                self._handle(msg)  # a task may be queued before the welcome is read
        except BaseException:
            link.close()
            raise
        self._link = link
        if self.watch_parent:
            self._watch = ParentWatch(link.ppid)

    def close(self) -> None:
        """Leave the link (saying bye). Idempotent."""
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if self._link is not None:
            self._link.close(bye="" if self._ended else "script finished")
            self._link = None

    # --- the FLARE surface ---------------------------------------------------------------------------

    def is_running(self) -> bool:
        """Block until the next task is here (True) or the job has ended (False)."""
        link = self._require()
        while (msg := link.recv(0)) is not None:  # what already arrived (an end_job during training)
            self._handle(msg)
        while self._current is None and not self._tasks and not self._ended:
            msg = link.recv(None, until=lambda: self._ended)
            if msg is not None:
                self._handle(msg)
        return not self._ended

    def receive(self, timeout: float | None = None) -> FLModel | None:
        """The current task's model (CPU tensors); None when the job ended or ``timeout`` passed first.

        Calling it again before ``send`` returns the same task's model again.
        """
        link = self._require()
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._current is None:
            while not self._tasks and not self._ended:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                msg = link.recv(left, until=lambda: self._ended)
                if msg is None and deadline is not None and time.monotonic() >= deadline:
                    return None
                if msg is not None:
                    self._handle(msg)
        if self._ended or (self._current is None and not self._tasks):
            return None
        if self._current is None:
            self._next_task()
        task = self._current
        assert task is not None
        options = TaskOptions.parse(task.options)
        path = task.path
        if self._received is None and path is not None:
            if not task.take:
                received = load_params(path)
            else:
                self._taken = take_params(path)
                if self._wants_diff(task, options):  # the file stays the base; the script trains a copy
                    received = load_params(self._taken.held)
                else:  # the file's own pages: trained in place, sent as they are
                    received = dict(self._taken.params)
            self._received = self._take_controls(task, options, received)
        if self._task_started is None:
            self._task_started = time.monotonic()
        meta = dict(task.meta)
        if task.params_type is not None:  # what the strategy wants back, and the model's name in cross-site evaluation
            meta["params_type"] = task.params_type
        if task.model_name:
            meta["model_name"] = task.model_name
        meta.update(version=task.version, job_id=task.job_id, task_id=task.task_id, site_name=self.site_name)
        meta.update({FLMetaKey.CURRENT_ROUND: task.round, FLMetaKey.TOTAL_ROUNDS: task.total_rounds})
        params: Mapping[str, Any] | None = self._received
        if params is not None and options.exchange is ExchangeFormat.NUMPY:
            params = to_numpy_params(params)
        return FLModel(
            params=params,
            params_type=ParamsType.FULL,
            meta=meta,
            current_round=task.round,
            total_rounds=task.total_rounds,
        )

    def _take_controls(
        self, task: Task, options: TaskOptions, received: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The received weights without SCAFFOLD's controls; a training task's controls open the session's
        SCAFFOLD bookkeeping (``fedbus.client.scaffold``)."""
        weights, controls = split_controls(received)
        if task_name(task) == TRAIN and options.scaffold and not controls:
            raise JobError(f"task {task.task_id} is SCAFFOLD's, but its model carries no control variates")
        if controls and task_name(task) == TRAIN:
            self.scaffold.begin(weights, controls)
        return weights

    def send(self, model: FLModel, clear_cache: bool = True) -> bool:
        """Send the current task's result; True once the site confirms the broker has it, False when it was lost.

        Raises JobError when the site refuses the result (a params file it cannot read, a privacy filter
        failing: something to fix). An update *lost* on the way (the broker unreachable, or refusing it
        because the task or job is over, or the job ending while it was on its way) is logged and ``send``
        returns False: in federated learning a lost update is routine (stragglers, the last updates of a
        finished job, a broker restart), and a script that crashed over one would drop its site from the job;
        a script that cares (it keeps state per delivered update) reads the result. With ``clear_cache=False``
        the task stays current (FLARE's semantics), so ``receive`` returns the same model again.

        "The broker has it": a result with params is confirmed once the broker acknowledged its upload (after
        recording it); a result of metrics only (an evaluation) once the site handed it to a live connection to
        the broker, which sends no receipt for it.
        """
        link = self._require()
        if not isinstance(model, FLModel):
            raise ConfigError(f"send() takes an FLModel, got {type(model).__name__}")
        if self._current is None and self._tasks:  # FLARE allows send() without receive()
            self._next_task()
        task = self._current
        if self._ended:
            return False  # the job is over: nobody takes results any more
        if task is None:
            raise LocalProtocolError("send() without a task: call is_running()/receive() first")
        result = self._result(task, model)
        link.send(result)
        delivered = False
        while True:
            msg = link.recv(None, until=lambda: self._ended)
            if msg is None:  # the job ended while the upload was in flight: nothing left to confirm
                self._logger.warning("the job ended before the broker confirmed the update", task_id=task.task_id)
                break
            if isinstance(msg, Reply) and msg.rid == 0:
                if not msg.ok and not msg.data.get("lost"):
                    raise JobError(f"the site refused the result of task {task.task_id}: {msg.error}")
                if not msg.ok:
                    self._logger.warning("update lost on the way to the broker", task_id=task.task_id, reason=msg.error)
                delivered = msg.ok
                break
            self._handle(msg)
        if clear_cache:
            self._current = None
            self._received = None
            self._taken = None
            self._task_started = None
        if clear_cache and task_name(task) == TRAIN:
            self._trained += 1
            every = TaskOptions.parse(task.options).memory_gc_rounds
            if every and self._trained % every == 0:
                self._collect()
        return delivered

    def _next_task(self) -> None:
        self._current, self._received, self._taken = self._tasks.popleft(), None, None
        self.scaffold.end()  # a task left unanswered leaves no SCAFFOLD state behind

    def _collect(self) -> None:
        """``memory_gc_rounds``: the session holds nothing of past tasks now; collect what the script let go."""
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def log(
        self, key: str, value: Any, step: int | None = None, *, kind: str | None = None, writer: str | None = None
    ) -> None:
        """Record a metric (shown by ``fedbus status``): a ``job_event(log)`` relayed by the site.

        ``kind`` and ``writer`` are set by the tracking writers (``fedbus.client.tracking``): what the record is
        (``scalar``, ``metrics``, ``param``, ``text`` ...) and which writer made it; the broker's tracking sink
        writes it to the job's TensorBoard / MLflow / W&B files.
        """
        link = self._require()
        if not isinstance(key, str):
            raise ConfigError(f"log() key must be str, got {type(key).__name__}")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            step = plain_values(step, f"log step of {key!r}")
            if isinstance(step, float) and step.is_integer():
                step = int(step)
            if not isinstance(step, int) or isinstance(step, bool):
                raise ConfigError(f"log step of {key!r} must be an integer, got {step!r}")
        data: dict[str, Any] = {"key": key, "value": plain_values(value, f"log value {key!r}"), "step": step}
        if kind is not None:
            data["kind"] = kind
        if writer is not None:
            data["writer"] = writer
        link.send(JobEvent(job_id=self.job_id, event="log", data=data))

    def get_task_name(self) -> str:
        """``"train"``, ``"evaluate"`` or ``"submit_model"`` for the current task (``""`` before the first one)."""
        task = self._current or (self._tasks[0] if self._tasks else None)
        return task_name(task) if task is not None else ""

    def is_train(self) -> bool:
        return self.get_task_name() == TRAIN

    def is_evaluate(self) -> bool:
        return self.get_task_name() == EVALUATE

    def is_submit_model(self) -> bool:
        """True when the task asks for the site's local model (cross-site evaluation): send it as FULL params."""
        return self.get_task_name() == SUBMIT_MODEL

    @property
    def options(self) -> TaskOptions | None:
        """The current (or next queued) task's options; None before the first task."""
        task = self._current or (self._tasks[0] if self._tasks else None)
        return TaskOptions.parse(task.options) if task is not None else None

    def get_config(self) -> dict[str, Any]:
        """The client API's configuration in FLARE's shape (``nvflare.client.get_config()``): the site's identity
        and, under ``TASK_EXCHANGE``, what the current task asks (defaults before the first task)."""
        options = self.options or TaskOptions()
        task = self._current or (self._tasks[0] if self._tasks else None)
        return {
            FLMetaKey.JOB_ID: self.job_id,
            FLMetaKey.SITE_NAME: self.site_name,
            "TASK_EXCHANGE": {
                "exchange_format": str(options.exchange),
                "transfer_type": str(options.transfer_type),
                "train_task_name": TRAIN,
                "eval_task_name": EVALUATE,
                "submit_model_task_name": SUBMIT_MODEL,
                "memory_gc_rounds": options.memory_gc_rounds,
            },
            "options": dict(task.options) if task is not None else {},
        }

    def system_info(self) -> dict[str, Any]:
        """FLARE's keys (``site_name``, ``job_id``) and fedbus's (``site_index``, ``num_sites``, ``workspace``,
        ``speed_factor`` for a simulated slow site)."""
        info: dict[str, Any] = {
            "site_name": self.site_name,
            "job_id": self.job_id,
            "site_index": self.site_index,
            "num_sites": self.num_sites,
            "workspace": str(self.workspace),
        }
        if self.speed_factor is not None:
            info["speed_factor"] = self.speed_factor
        return info

    # --- internals -----------------------------------------------------------------------------------

    def _require(self) -> SiteLink:
        if self._link is None:
            raise LocalProtocolError("fedbus.client: call init() first")
        return self._link

    def _handle(self, msg: Any) -> None:
        """Note what the site pushed while we waited for something else."""
        if isinstance(msg, Task):
            if msg.job_id != self.job_id:
                raise JobError(f"the site sent a task of job {msg.job_id!r}; this script runs {self.job_id!r}")
            self._tasks.append(msg)
        elif isinstance(msg, EndJob):
            self._ended = True
            self._tasks.clear()
        # welcome repeats, stray replies and errors for messages we no longer wait on change nothing

    def _wants_diff(self, task: Task, options: TaskOptions) -> bool:
        """Whether the task wants deltas back: the strategy's word (FedBuff) or the job's ``transfer_type``."""
        return task.params_type == ParamsType.DIFF or options.transfer_type is TransferType.DIFF

    def _result(self, task: Task, model: FLModel) -> Result:
        options = TaskOptions.parse(task.options)
        metrics = plain_values(model.metrics or {}, "FLModel.metrics")
        user_meta = plain_values(model.meta or {}, "FLModel.meta")
        weight = user_meta.get(NUM_STEPS_CURRENT_ROUND) or 1.0  # absent (or 0 steps): an unweighted vote
        if not isinstance(weight, int | float) or isinstance(weight, bool) or weight < 0:
            raise ConfigError(f"meta[{NUM_STEPS_CURRENT_ROUND!r}] must be a number >= 0, got {weight!r}")
        params_type = ParamsType(model.params_type or ParamsType.FULL)
        train_s = None if self._task_started is None else time.monotonic() - self._task_started
        path: str | None = None
        kind = task_name(task)
        if kind in (TRAIN, SUBMIT_MODEL) and model.params is not None:
            given = model.params
            if options.exchange is ExchangeFormat.NUMPY and self._received is not None and isinstance(given, Mapping):
                given = keep_received_dtypes(given, self._received)
            params = to_cpu_params(given)
            if not _SAFE_NAME.fullmatch(task.task_id):
                raise JobError(f"task id {task.task_id!r} is not a safe file name")
            out = self.workspace / "outbox" / f"{task.task_id}.safetensors"
            taken, written = self._taken, False
            controls: dict[str, torch.Tensor] = {}
            if kind == TRAIN and self.scaffold.open:  # the result adds the controls: it is written, never the file
                controls = self.scaffold.finish(params, is_diff=params_type is ParamsType.DIFF)
            if kind == SUBMIT_MODEL:  # the local model itself: there is no received model to differ from
                if params_type is ParamsType.DIFF:
                    raise ConfigError("a submit_model task takes the local model itself: send FULL params, not a DIFF")
            elif self._wants_diff(task, options) and params_type is ParamsType.FULL:
                # The base is the task's file, not the tensors handed to the script: a script may train those
                # in place (add_ on received params), which made every delta zero.
                params_type = ParamsType.DIFF
                if taken is not None:
                    self._taken = None  # its tensors become the difference (or are read as the base): once only
                    if not controls and taken.diff_in_place(params):
                        params, written = taken.params, taken.link(out)
                    else:
                        params = diff_params(params, taken.params)
                else:
                    if task.path is None:
                        raise JobError(f"cannot send DIFF for task {task.task_id}: the task carried no model")
                    params = diff_params(params, load_params(task.path))
            elif taken is not None and not controls:
                written = taken.link_as(params, out)
            if controls:
                params = {**params, **controls}
            if not written:
                save_params(out, params)
            path = str(out)
        return Result(
            job_id=self.job_id,
            task_id=task.task_id,
            version=task.version,
            params_type=str(params_type),
            weight=float(weight),
            metrics=metrics,
            meta=user_meta,
            sid=None,
            path=path,
            train_s=train_s,
        )
