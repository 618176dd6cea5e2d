"""structlog configured once: human-readable on a terminal, JSON lines when asked (``--log-json``)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_configured = False


class _StderrLogger:
    """Writes each line to whatever ``sys.stderr`` is at that moment, not the one seen at configure time:
    a test runner or an embedding application swaps (and closes) streams, and a log line must never fail."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


def configure(*, json: bool | None = None, level: str = "info", stream: Any = None) -> None:
    """Set up structlog for a daemon or the CLI. Idempotent unless called with different arguments."""
    global _configured
    if json is None:
        json = not (stream or sys.stderr).isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=stream) if stream is not None else lambda *_: _StderrLogger(),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str, **context: Any) -> structlog.typing.FilteringBoundLogger:
    """A logger bound to ``name`` (the component) and any context (job, site, stream)."""
    if not _configured:
        configure(level="warning")
    return structlog.get_logger(component=name, **context)
