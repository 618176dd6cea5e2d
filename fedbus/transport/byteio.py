"""What a stream carries, as transport sees it: bytes from a ``Source``, into a ``Sink``.

``StreamHub`` moves a stream's bytes, credit and acknowledgements; it never looks inside them. What the bytes
are (a model's safetensors layout, tensors laid out in a buffer or a spool file) is the business of the objects
behind these two protocols: ``fedbus.modelio`` implements them for models.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence
from typing import Any, Protocol

from fedbus.protocol.messages import Offer


class StreamSums(Protocol):
    """A source's chunk sums for one chunking: the sum of chunk ``k`` and the digest of the whole stream."""

    def __len__(self) -> int: ...

    def __getitem__(self, k: int, /) -> int: ...

    def prefetch(self, start: int, end: int, pool: concurrent.futures.Executor) -> None:
        """Start computing the sums of the chunks in byte range [start, end) in ``pool``."""
        ...

    def digest(self) -> str:
        """The whole stream's digest (``fedbus.digest.stream_digest`` of every chunk's sum)."""
        ...


class Source(Protocol):
    """The bytes of one outgoing stream: ``header`` (sent in the offer) is their first bytes."""

    @property
    def header(self) -> bytes: ...

    @property
    def total(self) -> int: ...

    def sums(self, chunk_size: int, alg: str) -> StreamSums:
        """The chunk sums of this source cut in ``chunk_size`` chunks, with algorithm ``alg``."""
        ...

    def whole(self) -> bytes:
        """All ``total`` bytes in one piece (a small stream rides inside its offer)."""
        ...

    def frames(self, off: int, length: int) -> list[Any]:
        """Buffers covering bytes [off, off + length): one chunk's payload frames."""
        ...


class Sink(Protocol):
    """Where one incoming stream's bytes land.

    The hub sets ``peer``, calls ``open`` with the offer (raising ``RemoteProtocolError`` refuses the stream),
    ``write`` for every chunk (possibly on a placement thread; it returns the chunk sum of what landed),
    ``record`` once a chunk is verified, then ``finish`` once the whole stream is, and sets ``result`` to what
    ``finish`` returned (or to the stream's error). ``settled``, when the owner sets it, holds back the
    stream's ACK until the owner resolved it. ``close`` is always called at the end.
    """

    peer: bytes
    alg: str
    offer: Offer | None
    result: asyncio.Future[Any]
    settled: asyncio.Future[None] | None

    def open(self, offer: Offer, *, resume: bool = False, inline: Sequence[memoryview] = ()) -> None: ...

    def write(self, off: int, frames: Sequence[memoryview]) -> int: ...

    def record(self, off: int, length: int, chunk_sum: int) -> None: ...

    def finish(self) -> Any: ...

    def close(self) -> None: ...
