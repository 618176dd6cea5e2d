"""SIGTERM ends a daemon whatever its event loop is doing: a loop that never comes back to its selector (a
handler spinning in Python) cannot run a loop callback, so the signal's Python handler starts a watchdog that
ends the process (``fedbus.daemon.Lifecycle``)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.timeout(60)

STUCK = textwrap.dedent(
    """
    import sys
    from fedbus.daemon import Lifecycle

    class Stuck:
        async def startup(self):
            pass

        async def main_loop(self):
            print("spinning", flush=True)
            while True:  # a handler that never yields: the loop never runs again
                pass

        async def shutdown(self, deadline):
            pass

    Lifecycle(Stuck(), shutdown_deadline=1.0).run()
    """
)


def test_sigterm_ends_a_daemon_whose_loop_is_stuck() -> None:
    proc = subprocess.Popen([sys.executable, "-c", STUCK], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "spinning"
        time.sleep(0.2)  # well inside the spin
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)  # a liveness bound: without the watchdog it never ends
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1 and "did not stop in time" in err  # the watchdog's exit
