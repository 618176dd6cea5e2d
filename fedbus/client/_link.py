"""The script's end of the local link: a synchronous DEALER to the site, and noticing a dead site.

The training script is single-threaded user code that blocks between calls, so this side is a plain
(not asyncio) socket. The site sends nothing while the script trains, so silence proves nothing; what
does: the site process is gone (our parent PID changed: the site started us and a dead parent's
children are re-parented), the site said ``bye``, or the link has been disconnected for ``link_timeout``
seconds (a socket monitor reports it). Every wait polls with a short timeout and checks those three, so
a script whose site died raises ``JobError`` instead of hanging forever on a GPU; and a script that is
busy training when its site dies is ended by ``ParentWatch``, a thread that checks the parent PID.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Callable

from fedbus.errors import JobError, RemoteProtocolError, TransportError
from fedbus.log import get_logger
from fedbus.protocol.envelope import decode, encode
from fedbus.protocol.messages import Bye, Message
from fedbus.transport.link import LinkSocket, SendTimeout

POLL_S = 0.25
"""How often a blocked wait wakes up to check that the site is still there."""


class ParentWatch:
    """End this process once the site that started it (our parent ``ppid``) is gone.

    A script whose site died can deliver nothing and may hold a GPU; while it trains it never calls into
    fedbus, so the blocking waits cannot notice. This daemon thread does: SIGTERM (the script's handlers,
    e.g. Lightning's, may save state), then SIGKILL after ``kill_after`` s; to the whole process group
    when the script leads one (the site starts it in a new session), so DataLoader workers go too.
    """

    def __init__(self, ppid: int, *, interval: float = 1.0, kill_after: float = 5.0) -> None:
        self.ppid = ppid
        self.interval = interval
        self.kill_after = kill_after
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fedbus-site-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while os.getppid() == self.ppid:
            if self._stop.wait(self.interval):
                return
        get_logger("client").warning("the site process is gone: ending this script", site_pid=self.ppid)
        group = os.getpgrp() == os.getpid()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(os.getpid(), sig)
                else:
                    os.kill(os.getpid(), sig)
            time.sleep(self.kill_after)

    def stop(self) -> None:
        self._stop.set()


def _exit_watch(pid: int | None) -> int:
    """A pidfd of process ``pid`` (readable once it has exited, even before it is reaped, and never confused with
    a later process given the same PID); -1 if it has already gone, -2 without a PID or where Linux's pidfds are
    not available (the parent-PID check remains)."""
    if pid is None:
        return -2
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return -1
    except (AttributeError, OSError):
        return -2


class SiteLink:
    """One DEALER connected to the site's link address; ``recv`` returns the next valid message."""

    def __init__(self, address: str, *, link_timeout: float = 30.0, site_pid: int | None = None) -> None:
        """``site_pid``: the site process that started this script, watched for its exit: a script whose site
        died before it got here has a new parent already, so the parent-PID check alone cannot tell."""
        self.address = address
        self.link_timeout = link_timeout
        self.link = LinkSocket(address, send_timeout=link_timeout)
        self.ppid = os.getppid()
        self._gone: str | None = None
        self._site_exit = _exit_watch(site_pid)  # readable once the site process has ended
        if self._site_exit == -1:
            self._gone = "the site process is gone (it ended before this script connected)"
        self._mid = 0
        self.log = get_logger("client.link")

    def send(self, msg: Message) -> None:
        """Queue ``msg`` for the site; raises JobError if the site is gone or the queue stays full."""
        self._check_alive()
        self._mid += 1
        try:
            self.link.send(encode(msg, self._mid))
        except SendTimeout as exc:
            raise JobError(f"the site at {self.address} took no message for {self.link_timeout:g} s") from exc
        except TransportError as exc:
            raise JobError(f"cannot send to the site at {self.address}: {exc}") from exc

    def recv(self, timeout: float | None = None, *, until: Callable[[], bool] | None = None) -> Message | None:
        """The next message from the site, or None once ``timeout`` seconds (None: forever) have passed.

        ``until`` is checked on every wake-up; when it returns true the wait ends with None (used to stop
        waiting for a reply once the job has ended). A dead site raises JobError.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if until is not None and until():
                return None
            wait = POLL_S if deadline is None else min(POLL_S, max(0.0, deadline - time.monotonic()))
            if self.link.poll(wait):
                msg = self._read()  # what the site said before dying is still read first
                if msg is not None:
                    return msg
                continue
            self._check_alive()
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _read(self) -> Message | None:
        frames = self.link.recv()
        try:
            msg, _mid = decode(frames[0])
        except RemoteProtocolError as exc:
            self.log.warning("invalid message from the site ignored", reason=str(exc))
            return None
        if isinstance(msg, Bye):
            self._gone = f"the site closed the link ({msg.reason or 'bye'})"
            self._check_alive()
        return msg

    def _check_alive(self) -> None:
        if self._gone is None and os.getppid() != self.ppid:
            self._gone = "the site process is gone (this script's parent exited)"
        if self._gone is None and self._site_exit >= 0 and select.select([self._site_exit], [], [], 0)[0]:
            self._gone = "the site process is gone (it exited)"
        down = self.link.down_since
        if self._gone is None and down is not None and time.monotonic() - down > self.link_timeout:
            self._gone = f"no connection to the site at {self.address} for {self.link_timeout:g} s"
        if self._gone is not None:
            raise JobError(self._gone)

    def close(self, bye: str | None = None) -> None:
        """Say ``bye`` (when asked and the site is still there) and close the socket."""
        if bye is not None and self._gone is None:
            self._mid += 1
            self.link.send_now(encode(Bye(bye), self._mid))
        self.link.close()
        if self._site_exit >= 0:
            os.close(self._site_exit)
            self._site_exit = -2
