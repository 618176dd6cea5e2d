"""Log streaming: the script's output, as the site's log file of it grows, relayed to the broker in batches.

Why follow the file: a child script's stdout and stderr already go to ``jobs/JOB/script.log`` (``child.py``),
and SimEnv's script threads write theirs there too (``recipes._threads``), so one follower serves both, and the
site's own copy stays whole whatever the broker gets. The follower starts at the file's size when the script
starts (the file is appended to across redeploys), reads what was added every ``interval_s``, and reports
complete lines as ``JobEvent(event="log_text", data={"lines": [...], "dropped": n})`` through the uplink's
backlog (in order, kept while the broker is unreachable).

Bounds: a batch carries at most ``BATCH_BYTES`` of text (the envelope cap is 256 KiB), a line at most
``MAX_LINE`` bytes (longer ones are cut), and the relay sends at most ``rate_bytes`` per second. A script that
writes faster falls behind; once more than ``MAX_BEHIND`` bytes wait, the relay skips to the file's end and
says in its next batch how many bytes it dropped (the site's file keeps them all).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from fedbus.protocol.messages import JobEvent

BATCH_BYTES = 64 * 1024
MAX_LINE = 8 * 1024
RATE_BYTES = 128 * 1024
"""Bytes of output relayed per second, at most."""
MAX_BEHIND = 4 * 1024 * 1024
INTERVAL_S = 0.5


class LogRelay:
    """Follows one script's log file and reports its new lines to the broker."""

    def __init__(
        self,
        path: Path,
        job_id: str,
        report: Callable[[JobEvent], None],
        *,
        interval_s: float = INTERVAL_S,
        rate_bytes: int = RATE_BYTES,
    ) -> None:
        self.path = path
        self.job_id = job_id
        self.report = report
        self.interval_s = interval_s
        self.rate_bytes = rate_bytes
        self.offset = _size(path)
        self.dropped = 0
        self._partial = b""

    async def run(self) -> None:
        """Relay until cancelled; the runner calls ``pump(final=True)`` once the script has ended."""
        while True:
            await asyncio.sleep(self.interval_s)
            self.pump(int(self.rate_bytes * self.interval_s))

    def pump(self, budget: int | None = None, final: bool = False) -> None:
        """Read up to ``budget`` new bytes (default: the rate's worth of a second) and report their lines;
        ``final`` also reports a last line without its newline."""
        budget = self.rate_bytes if budget is None else budget
        size = _size(self.path)
        if size < self.offset:  # the file was replaced: follow the new one from its start
            self.offset, self._partial = 0, b""
        if size - self.offset > MAX_BEHIND:
            self.dropped += size - self.offset + len(self._partial)
            self.offset, self._partial = size, b""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(min(budget, size - self.offset))
        except OSError:
            return
        self.offset += len(data)
        data = self._partial + data
        cut = len(data) if final else data.rfind(b"\n") + 1
        self._partial = data[cut:]
        if len(self._partial) > MAX_LINE:  # a line without end that outgrew the limit: sent cut
            cut, self._partial = len(data), b""
        self._send([line[:MAX_LINE] for line in data[:cut].splitlines()])

    def _send(self, lines: list[bytes]) -> None:
        batch: list[str] = []
        size = 0
        for line in lines:
            if batch and size + len(line) + 1 > BATCH_BYTES:
                self._report(batch)
                batch, size = [], 0
            batch.append(line.decode("utf-8", errors="replace"))
            size += len(line) + 1
        if batch or self.dropped:
            self._report(batch)

    def _report(self, batch: list[str]) -> None:
        data = {"lines": batch, "dropped": self.dropped}
        self.dropped = 0
        self.report(JobEvent(self.job_id, "log_text", data=data))


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
