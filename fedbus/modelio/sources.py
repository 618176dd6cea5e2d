"""A model as the source of a stream: its safetensors layout, and the chunk sums of it, computed once."""

from __future__ import annotations

import concurrent.futures
import mmap
import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedbus import digest
from fedbus.errors import LocalProtocolError
from fedbus.modelio import serde


class ModelSource:
    """Bytes to stream: the safetensors layout of a state_dict, digested once however often it is sent.

    A broker broadcasting one global model to N sites pays for the chunk sums once.
    """

    def __init__(self, lay: serde.Layout) -> None:
        self.layout = lay
        self.path: str | None = None  # the file streamed, for a source made by from_file
        self._index = digest.PartIndex(lay.parts)  # built once: slicing a chunk is then O(log parts)
        self._sums: dict[tuple[int, str], ChunkSums] = {}
        self._whole: bytes | None = None

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], metadata: dict | None = None) -> ModelSource:
        return cls(serde.layout(state_dict, metadata))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, max_total: int = 1 << 44) -> ModelSource:
        """A ``.safetensors`` file streamed straight from a read-only memory map (the page cache)."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) if size else b""
        view = memoryview(mm)
        head_len = int.from_bytes(view[:8], "little") if size >= 8 else 0
        data_start, specs, metadata = serde.parse_header(
            view[: 8 + min(head_len, serde.MAX_HEADER_BYTES)], max_total=max_total, total=size
        )
        lay = serde.Layout(
            header=bytes(view[:data_start]), specs=tuple(specs), parts=[view], total=size, metadata=metadata
        )
        source = cls(lay)
        source.path = os.fspath(path)
        return source

    @property
    def total(self) -> int:
        return self.layout.total

    @property
    def header(self) -> bytes:
        """The layout's header bytes: the stream's first bytes, sent in its offer."""
        return self.layout.header

    def sums(self, chunk_size: int, alg: str) -> ChunkSums:
        """The chunk sums for this chunking, computed as chunks are first sent and kept for later sends."""
        key = (chunk_size, alg)
        if key not in self._sums:
            self._sums[key] = ChunkSums(self, chunk_size, alg)
        return self._sums[key]

    def whole(self) -> bytes:
        """All of the stream's bytes in one piece, joined once per source: how a small model travels inside its
        offer. The receiver gets one frame it can keep as its buffer (``BufferSink._adopt``) instead of a
        frame per tensor to copy out, and a broker sending one global model to every site joins it once."""
        if self._whole is None:
            self._whole = b"".join(self.frames(0, self.total))
        return self._whole

    def frames(self, off: int, length: int) -> list[Any]:
        """Zero-copy slices of the tensors' memory covering [off, off + length): one chunk's frames."""
        return digest.chunk_parts(self._index, off, length)


class ChunkSums(Sequence[int]):
    """A model's chunk sums, each computed when its chunk is first sent, so sending starts at once.

    Computing all sums before the offer would be a serial pass over the model before its first byte leaves;
    lazily, each 4 MiB sum is taken just before its chunk leaves, while the
    bytes are hot in cache. A broker broadcasting one global model to N sites still pays for them once.
    """

    def __init__(self, source: ModelSource, chunk_size: int, alg: str) -> None:
        # A weak reference: the source holds its sums, and a cycle would keep every old global model alive
        # until a full garbage collection (the broker would hold one more model per round).
        self._ref, self._total = weakref.ref(source), source.total
        self._chunk, self._alg = chunk_size, alg
        self._sums: list[int | None] = [None] * -(-source.total // chunk_size)
        self._coming: dict[int, concurrent.futures.Future[int]] = {}  # sums being computed by placement threads
        self._digest: str | None = None

    def __len__(self) -> int:
        return len(self._sums)

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        got = self._sums[k]
        if got is None:
            coming = self._coming.pop(k % len(self), None)
            got = self._sums[k] = coming.result() if coming is not None else self._compute(k % len(self))
        return got

    def prefetch(self, start: int, end: int, pool: concurrent.futures.Executor) -> None:
        """Start computing the sums of the chunks in byte range [start, end) in ``pool``, so the sender's
        loop finds them ready instead of reading each chunk itself before it leaves."""
        for k in range(start // self._chunk, min(len(self), -(-end // self._chunk))):
            if self._sums[k] is None and k not in self._coming:
                self._coming[k] = pool.submit(self._compute, k)

    def _compute(self, k: int) -> int:
        source = self._ref()
        if source is None:
            raise LocalProtocolError("chunk sums asked of a model source that is gone")
        off = k * self._chunk
        return digest.chunk_sum(source.frames(off, min(self._chunk, self._total - off)), self._alg)

    def digest(self) -> str:
        """The whole-stream digest (every chunk's sum, computing those not yet sent), computed once: a broker
        names it in every task's offer and audit record, which at many sites would add up."""
        if self._digest is None:
            total, chunk = self._total, self._chunk
            self._digest = digest.stream_digest(
                ((k * chunk, min(chunk, total - k * chunk), self[k]) for k in range(len(self))), self._alg
            )
        return self._digest
