"""How many threads a process should give to work that scales with cores: one place for the rule and its
environment override, so placement threads and zmq I/O threads are chosen the same way."""

from __future__ import annotations

import os

from fedbus.log import get_logger

log = get_logger("cores")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_count(env: str, default: int, *, minimum: int = 0) -> int:
    """``default``, unless the environment variable ``env`` names another count (a bad value is logged)."""
    raw = os.environ.get(env)
    if raw is not None:
        try:
            return max(minimum, int(raw))
        except ValueError:
            log.warning("thread count is not an int; using the default", variable=env, value=raw)
    return default
