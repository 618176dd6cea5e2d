"""fedbus.log: a log line never fails because the stream seen at configure time has gone."""

from __future__ import annotations

import io
import json
import sys

import pytest

from fedbus import log


def test_lines_go_to_the_current_stderr_even_after_the_old_one_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    log.configure(json=True, level="warning")  # as the CLI does, under a test runner's captured stderr
    first.close()  # the runner closes it after that test
    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    try:
        log.get_logger("test").warning("refused", reason="shape")  # raised ValueError: I/O on closed file
        assert json.loads(now.getvalue())["reason"] == "shape"
    finally:
        log.configure(level="warning")


def test_an_explicit_stream_is_kept() -> None:
    stream = io.StringIO()
    log.configure(json=True, level="info", stream=stream)
    try:
        log.get_logger("test").info("hello")
        assert json.loads(stream.getvalue())["event"] == "hello"
    finally:
        log.configure(level="warning")
