"""A job's folder at a site: where its files, models, log and local link live, and what may be read there.

Layout, under ``WORKSPACE/jobs/JOB`` (mode 0700: other users of the machine see nothing)::

    files/                   the unpacked job archive; the script's working directory
    inbox/TASK.safetensors   a model from the broker, written in place as its chunks arrive
    outbox/TASK.safetensors  the script's result for that task
    inbox/.free-*, outbox/.free-*  files of finished tasks, reused for the next ones (fedbus.recycle)
    inbox/.held-*            task files the script took and maps (fedbus.client._files)
    script.log               the script's stdout and stderr (appended across runs)
    link.sock                the local link: ipc, mode 0600, plus a per-job token checked on hello

Why the path checks: the script is the job author's code, not the site operator's, so a result file
must be exactly ``outbox/TASK.safetensors`` and a regular file; otherwise a script could make the site
upload any file the site's user can read (keys, other jobs' data) under the site's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from fedbus.errors import JobError, RemoteProtocolError
from fedbus.recycle import HELD_PREFIX, FilePool
from fedbus.transport.context import Context
from fedbus.transport.endpoint import RouterEndpoint

MAX_IPC_PATH = 100
"""sun_path holds 107 bytes on Linux; a longer link path is bound in a short private temp dir instead."""


class JobFolder:
    """The paths of one job at this site, and the few operations that must get them right."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = root / "files"
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.log_path = root / "script.log"
        self._link_dir: Path | None = None
        self._link_path: Path | None = None

    def prepare(self) -> None:
        """Create the folders (synchronously: a model stream may follow the deploy at once), clearing old runs."""
        for d in (self.files, self.inbox, self.outbox):
            if d.exists():
                shutil.rmtree(d)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        self.inbox.mkdir()
        self.outbox.mkdir()

    def inbox_file(self, task_id: str) -> Path:
        return self.inbox / f"{task_id}.safetensors"

    def outbox_file(self, task_id: str) -> Path:
        return self.outbox / f"{task_id}.safetensors"

    def result_file(self, claimed: Any, task_id: str) -> Path:
        """The script's params file, if ``claimed`` is exactly ``outbox/TASK.safetensors`` and a regular file."""
        want = self.outbox_file(task_id)
        if not isinstance(claimed, str) or Path(claimed) != want or want.is_symlink() or not want.is_file():
            raise RemoteProtocolError(f"result params must be the regular file {want}, got {str(claimed)[:200]!r}")
        return want

    def take_inbox_file(self, task_id: str) -> Path:
        """Where a task's model is written: a released inbox file renamed there when there is one."""
        path = self.inbox_file(task_id)
        FilePool(self.inbox).take(path)
        return path

    def remove_task_files(self, task_id: str) -> None:
        """The task is over: its files are released for the next tasks' models and results to reuse
        (``fedbus.recycle``), except a result file with another link (an upload kept for resuming)."""
        inbox, outbox = FilePool(self.inbox), FilePool(self.outbox)
        inbox.give(self.inbox_file(task_id))
        result = self.outbox_file(task_id)
        with contextlib.suppress(OSError):
            st = os.lstat(result)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                # To the box with fewer spare files: a script that took its model file sends it back as its result
                # (fedbus.client._files), and the next download then needs it in the inbox.
                (inbox if len(inbox.free()) < len(outbox.free()) else outbox).give(result)
        result.unlink(missing_ok=True)

    def drop_held(self) -> None:
        """Delete the task files a script took (``fedbus.client._files``) and had not given back: it has ended."""
        with contextlib.suppress(OSError), os.scandir(self.inbox) as entries:
            for e in entries:
                if e.name.startswith(HELD_PREFIX):
                    with contextlib.suppress(OSError):
                        os.unlink(e.path)

    def script(self, rel: str) -> Path:
        """The script the deploy names, which must be a regular file inside ``files/``."""
        path = (self.files / rel).resolve()
        if not path.is_relative_to(self.files.resolve()) or not path.is_file():
            raise JobError(f"script {rel[:200]!r} is not a file inside the job folder")
        return path

    def bind_link(self, ctx: Context) -> RouterEndpoint:
        """Bind the local link (ipc, mode 0600) for the script to connect to; in a private temp folder named for
        this site (``link_prefix``) when the job folder's path is too long for a socket."""
        path = self.root / "link.sock"
        if len(str(path)) > MAX_IPC_PATH:
            workspace = self.root.parent.parent
            self._link_dir = Path(tempfile.mkdtemp(prefix=f"{link_prefix(workspace)}{os.getpid()}-"))
            path = self._link_dir / "link.sock"
        path.unlink(missing_ok=True)  # a socket file left by a killed site
        link = RouterEndpoint.bind(ctx, f"ipc://{path}")
        os.chmod(path, 0o600)
        self._link_path = path
        return link

    def remove_link(self) -> None:
        if self._link_path is not None:
            with contextlib.suppress(OSError):
                self._link_path.unlink()
        if self._link_dir is not None:
            shutil.rmtree(self._link_dir, ignore_errors=True)


LINK_DIR = "fedbus-link-"


def link_prefix(workspace: Path) -> str:
    """The start of the names of a site's link folders in the temp folder: ``fedbus-link-TAG-``, TAG naming the
    site's workspace; the site's PID follows, so that a leftover is known for whose it is."""
    tag = hashlib.sha256(str(workspace.resolve()).encode()).hexdigest()[:12]
    return f"{LINK_DIR}{tag}-"


def remove_leftover_links(workspace: Path) -> list[Path]:
    """Remove the link folders a killed process of this site (this workspace) left in the temp folder; a folder of
    a process still alive (another site on this workspace, or this one) is left alone. Returns those removed."""
    prefix = link_prefix(workspace)
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        pid_text = path.name.removeprefix(prefix).split("-", 1)[0]
        if not path.is_dir() or path.is_symlink() or not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to judge
        return True
    return True


def script_env(*, link: str, token: str, job_id: str, site: str, index: int, count: int, root: Path) -> dict[str, str]:
    """The script's environment: the site's own plus what ``fedbus.client.init()`` reads."""
    return {
        **os.environ,
        "FEDBUS_LINK": link,
        "FEDBUS_LINK_TOKEN": token,
        "FEDBUS_JOB_ID": job_id,
        "FEDBUS_SITE_NAME": site,
        "FEDBUS_SITE_INDEX": str(index),
        "FEDBUS_NUM_SITES": str(count),
        "FEDBUS_WORKSPACE": str(root),
        "FEDBUS_SITE_PID": str(os.getpid()),
        "PYTHONUNBUFFERED": "1",
    }
