"""A whole stream delivered into a sink without a socket: for tests of what sinks do with the bytes."""

from __future__ import annotations

from typing import Any

from fedbus.modelio import serde
from fedbus.modelio.sinks import BufferSink
from fedbus.protocol.messages import Offer


def fill(sink: BufferSink, lay: serde.Layout, chunk: int = 1 << 20) -> Any:
    """Offer ``lay`` to ``sink``, write its parts in order (one chunk per part) and return what it finishes with."""
    sink.open(Offer(1, lay.total, chunk, "sum64", "", lay.header, {}))
    off = 0
    for part in lay.parts:
        sink.write(off, [part])
        off += part.nbytes
    return sink.finish()
