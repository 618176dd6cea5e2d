"""A receiving peer for the resume test, run as its own process.

``fresh PATH ADDRESS KILL_AFTER``: receive into a journaled file and SIGKILL itself after KILL_AFTER
verified chunks (the test's way of killing a receiver at an exact point mid-stream).
``resume PATH ADDRESS``: reopen the journal, ask the sender to continue, verify the model, print ok.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import torch
import zmq.asyncio

from fedbus.modelio.sinks import BufferSink
from fedbus.protocol.messages import STREAM_TYPES, Heartbeat
from fedbus.transport.endpoint import DealerEndpoint
from fedbus.transport.streams import StreamHub

CHUNK, WINDOW = 1 << 20, 4 << 20


def expected_model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"a": torch.randn(4 << 20, generator=g), "b": torch.randn(1000, generator=g)}


class DyingSink(BufferSink):
    kill_after = 0
    recorded = 0

    def record(self, off: int, length: int, chunk_sum: int) -> None:
        super().record(off, length, chunk_sum)
        self.recorded += 1
        if self.recorded >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


async def main(mode: str, path: str, address: str, kill_after: int = 0) -> None:
    ctx = zmq.asyncio.Context()
    ep = DealerEndpoint.connect(ctx, address, identity=b"rx")
    sinks: asyncio.Queue[BufferSink] = asyncio.Queue()

    async def on_offer(peer: bytes, offer: object) -> BufferSink:
        sink = DyingSink(max_total=1 << 30, path=path, journal=True)
        sink.kill_after = kill_after
        sinks.put_nowait(sink)
        return sink

    hub = StreamHub(ep, on_offer=on_offer, chunk_size=CHUNK, window=WINDOW, stall_timeout=30)
    await ep.send(b"", Heartbeat())

    async def pump() -> None:
        while True:
            inc = await ep.recv()
            if inc.msg.TYPE in STREAM_TYPES:
                await hub.dispatch(inc.peer, inc.msg, inc.payload)

    task = asyncio.ensure_future(pump())
    if mode == "resume":
        sinks.put_nowait(hub.resume_stream(*BufferSink.reopen(path, max_total=hub.max_total)))
    sink = await asyncio.wait_for(sinks.get(), 30)
    got = await asyncio.wait_for(sink.result, 60)
    want = expected_model()
    assert all(torch.equal(got[k], want[k]) for k in want)
    sys.stdout.write("ok\n")
    sys.stdout.flush()
    await asyncio.sleep(0.3)  # the ack leaves
    task.cancel()
    await hub.close()
    ep.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(main(args[0], args[1], args[2], int(args[3]) if len(args) > 3 else 0))
