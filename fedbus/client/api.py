"""The training-script API: NVIDIA FLARE's client functions (``import fedbus.client as flare``).

Each function acts on one :class:`~fedbus.client.session.ClientSession` per process, built from the ``FEDBUS_*``
variables the site set when it started the script (what FLARE scripts expect). The simulator
(``fedbus.recipes.SimEnv``) runs several sites' scripts as threads of one process: it binds one session to each
script thread (``bind_thread``), and the functions look for a thread's own session before the process's. The
session, its link and its handling of models live in ``fedbus.client.session``.
"""

from __future__ import annotations

import atexit
import threading
from typing import Any

from fedbus.client.model import FLModel
from fedbus.client.options import TaskOptions
from fedbus.client.session import (
    ENV_VARS,
    EVALUATE,
    SPEED_FACTOR_VAR,
    SUBMIT_MODEL,
    TRAIN,
    ClientSession,
    task_name,
)
from fedbus.errors import ConfigError, LocalProtocolError

__all__ = [
    "ENV_VARS",
    "EVALUATE",
    "SPEED_FACTOR_VAR",
    "SUBMIT_MODEL",
    "TRAIN",
    "ClientSession",
    "bind_thread",
    "current_options",
    "current_session",
    "get_config",
    "get_job_id",
    "get_site_name",
    "get_task_name",
    "init",
    "is_evaluate",
    "is_running",
    "is_submit_model",
    "is_train",
    "log",
    "receive",
    "send",
    "shutdown",
    "system_info",
    "task_name",
]

# --- one session per process (or per script thread): the functions FLARE scripts call ------------------

_session: ClientSession | None = None
_local = threading.local()


def bind_thread(session: ClientSession | None) -> None:
    """Make ``session`` this thread's own (the simulator runs each site's script in a thread); None unbinds.

    A bound thread's ``init()`` connects that session, and every module-level call uses it instead of the
    process's session, so sites in one process never share a link.
    """
    _local.session = session


def _bound() -> ClientSession | None:
    return getattr(_local, "session", None)


def init(rank: int | str | None = None) -> None:
    """Connect this script to its site (reads the ``FEDBUS_*`` environment). Idempotent.

    ``rank`` is FLARE's multi-process argument: only rank 0 (or None) may talk to the site; fedbus does
    not relay for other ranks yet, so they are refused rather than silently connected twice.
    """
    global _session
    if rank not in (None, 0, "0"):
        raise ConfigError(f"init(rank={rank!r}): only rank 0 talks to the site; call init() in rank 0 only")
    bound = _bound()
    if bound is not None:
        bound.init()  # idempotent; the thread's owner closes it
        return
    if _session is None:
        session = ClientSession.from_env()
        session.init()
        atexit.register(session.close)
        _session = session


def _get() -> ClientSession:
    bound = _bound()
    if bound is not None:
        return bound
    if _session is None:
        raise LocalProtocolError("fedbus.client: call init() first")
    return _session


def current_session() -> ClientSession:
    """The session the module-level functions act on (this thread's, else the process's); raises before init()."""
    return _get()


def current_options() -> TaskOptions | None:
    """The current task's options, or None when there is no session or no task yet."""
    session = _bound() or _session
    return session.options if session is not None else None


def is_running() -> bool:
    """Block until the next task arrives (True) or the job ends (False)."""
    return _get().is_running()


def receive(timeout: float | None = None) -> FLModel | None:
    """The current task's model as CPU tensors, with ``current_round``, ``total_rounds`` and meta."""
    return _get().receive(timeout)


def send(model: FLModel, clear_cache: bool = True) -> bool:
    """Send the task's result: True once the broker has it, False when it was lost on the way (the broker
    unreachable or refusing it, the job ended meanwhile); raises JobError when the site refuses it."""
    return _get().send(model, clear_cache)


def is_train() -> bool:
    return _get().is_train()


def is_evaluate() -> bool:
    return _get().is_evaluate()


def is_submit_model() -> bool:
    """True when the task asks for the site's local model (cross-site evaluation)."""
    return _get().is_submit_model()


def get_config() -> dict[str, Any]:
    """The client API's configuration in FLARE's shape: site identity and the current task's exchange settings."""
    return _get().get_config()


def get_task_name() -> str:
    return _get().get_task_name()


def get_site_name() -> str:
    return _get().site_name


def get_job_id() -> str:
    return _get().job_id


def system_info() -> dict[str, Any]:
    """site_name, job_id, site_index, num_sites and workspace (the job's folder at the site)."""
    return _get().system_info()


def log(key: str, value: Any, step: int | None = None) -> None:
    """Record a metric at the broker (a ``job_event(log)`` relayed by the site)."""
    _get().log(key, value, step)


def shutdown() -> None:
    """Leave the link now instead of at exit."""
    global _session
    bound = _bound()
    if bound is not None:
        bound.close()
    elif _session is not None:
        _session.close()
        _session = None
