"""A site daemon that SIGKILLs itself mid-upload: run as ``python -m tests.reliability.dying_site CHUNKS
<fedbus site arguments>``. After sending CHUNKS chunks of a result stream it stops sending, waits a second
(so the broker verifies what arrived) and kills itself: no goodbye, no cleanup, like a power cut."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from fedbus import cli
from fedbus.protocol.messages import Chunk
from fedbus.site import uplink


def main() -> int:
    kill_after = int(sys.argv[1])
    real_send = uplink._HubOutbox.send
    sent = 0

    async def send(self, peer, msg, payload=()):
        nonlocal sent
        if isinstance(msg, Chunk):
            if sent >= kill_after:
                asyncio.get_running_loop().call_later(1.0, os.kill, os.getpid(), signal.SIGKILL)
                await asyncio.Event().wait()  # this upload goes no further
            sent += 1
        await real_send(self, peer, msg, payload)

    uplink._HubOutbox.send = send  # type: ignore[method-assign]
    return cli.main(["site", *sys.argv[2:]])


if __name__ == "__main__":
    sys.exit(main())
