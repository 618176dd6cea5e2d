"""Uploads that outlive the site process: a site killed mid-upload resumes the stream where it stopped.

Why on disk: the broker keeps an interrupted incoming stream (and its verified offset) until the site is
declared gone, but the site's memory of the stream, its sid, its result message and its bytes, dies with
the process. So before a result leaves, the site keeps ``uploads/TASK.safetensors`` (the exact bytes
streamed: a hard link of the script's file, or the filtered model written once) and ``uploads/TASK.result``
(the result message as its envelope). A finished or failed upload removes both; only a kill leaves them.
When the job is deployed here again (the broker re-deploys on the site's hello), the runner sends the
result again and re-offers the stream under the same sid; the broker answers with the offset to resume from.

Layout, under ``WORKSPACE/jobs/JOB`` (``JobFolder.prepare`` clears files/inbox/outbox, never this)::

    uploads/TASK.safetensors
    uploads/TASK.result
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from fedbus.config import is_safe_name
from fedbus.errors import FedbusError
from fedbus.modelio import serde
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.envelope import decode, encode
from fedbus.protocol.messages import Result


class PendingUploads:
    """The uploads of one job at this site that were begun and not yet settled."""

    def __init__(self, job_root: Path, *, max_total: int) -> None:
        self.dir = job_root / "uploads"
        self.max_total = max_total

    def keep(self, result: Result, source: ModelSource) -> ModelSource:
        """Persist what is about to be streamed (blocking: call in a thread); returns the source to stream,
        read back from the kept file so that a resumed stream sends the very same bytes."""
        self.dir.mkdir(mode=0o700, exist_ok=True)
        data = self.dir / f"{result.task_id}.safetensors"
        data.unlink(missing_ok=True)
        try:
            if source.path is None:
                raise OSError("no file to link")
            os.link(source.path, data)  # the script's file as it is (no filter had to see it): no copy
        except OSError:
            serde.write_file(data, source.layout, durable=False)  # page cache survives a killed process
        tmp = self.dir / f"{result.task_id}.result.tmp"
        tmp.write_bytes(encode(result))
        os.replace(tmp, self.dir / f"{result.task_id}.result")
        return ModelSource.from_file(data, max_total=self.max_total)

    def done(self, task_id: str) -> None:
        for suffix in (".result", ".safetensors", ".result.tmp"):
            (self.dir / f"{task_id}{suffix}").unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove every kept upload of this job (the broker will never take them: it dropped the job)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def pending(self, job_id: str) -> list[tuple[Result, ModelSource]]:
        """Uploads a killed process left (unreadable or foreign records are dropped)."""
        out = []
        for record in sorted(self.dir.glob("*.result")) if self.dir.is_dir() else []:
            task_id = record.name.removesuffix(".result")
            try:
                msg, _ = decode(record.read_bytes())
                ok = isinstance(msg, Result) and msg.job_id == job_id and msg.task_id == task_id and msg.sid is not None
                if not ok or not is_safe_name(task_id):
                    raise FedbusError("not this job's result")
                out.append((msg, ModelSource.from_file(self.dir / f"{task_id}.safetensors", max_total=self.max_total)))
            except (FedbusError, OSError):
                with contextlib.suppress(OSError):
                    self.done(task_id)
        return out  # type: ignore[return-value]


def held_tasks(jobs_root: Path, limit: int) -> list[str]:
    """The tasks whose upload an earlier process of this site left under ``WORKSPACE/jobs`` (named in its hello:
    the broker sends a restarted site again only the tasks it does not hold), newest first: uploads of jobs
    that ended while the site was away stay until the job is deployed here again, and the limit cuts those."""
    found = []
    for record in jobs_root.glob("*/uploads/*.result"):
        name = record.name.removesuffix(".result")
        with contextlib.suppress(OSError):  # settled (removed) while we looked
            if is_safe_name(name):
                found.append((record.stat().st_mtime, name))
    return [name for _, name in sorted(found, reverse=True)[:limit]]


def held_jobs(jobs_root: Path) -> set[str]:
    """The jobs under ``WORKSPACE/jobs`` with an upload an earlier process of this site left (named in its hello's
    ``jobs``, so that a broker that does not run them any more says so, and the site forgets them)."""
    return {p.parent.parent.name for p in jobs_root.glob("*/uploads/*.result") if is_safe_name(p.parent.parent.name)}
