"""A model as the sink of a stream: one preallocated buffer (or shared file map), its tensors views of it."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fedbus import digest
from fedbus._memory import populate_for_write
from fedbus.errors import RemoteProtocolError, TransportError
from fedbus.modelio import serde
from fedbus.modelio.buffers import HUGE_BUFFER_MIN
from fedbus.modelio.finite import FiniteScan
from fedbus.protocol.envelope import decode, encode
from fedbus.protocol.messages import Offer
from fedbus.transport.endpoint import COPY_BELOW
from fedbus.transport.placement import PLACEMENT_MIN, placement_threads


class BufferSink:
    """Receives a stream into one preallocated buffer; the result is tensors that are views of it.

    ``expected`` (a reference state_dict or specs) makes the offer fail fast when names, shapes or
    dtypes differ from what the receiver will accept, before any byte of payload is taken.
    With ``path`` the buffer is a shared memory map of that file: the finished file is a valid
    ``.safetensors`` file (what a site hands its training script), and its pages live in the page cache.
    With ``journal`` too, every verified chunk is appended to ``path + ".journal"``, so a process killed
    mid-stream can ``reopen`` the file and ask the sender to resume from the last verified chunk.
    With ``tensors=False`` the result holds no tensor views, only ``raw``: for an owner that wants the file and
    never reads the tensors in process (a site's inbox, read by its training script).
    """

    def __init__(
        self,
        *,
        max_total: int,
        expected: Any = None,
        alg: str = digest.DEFAULT_ALG,
        path: str | None = None,
        journal: bool = False,
        buffer: torch.Tensor | None = None,
        scan_finite: bool = False,
        tensors: bool = True,
    ) -> None:
        self.max_total = max_total
        self.scan_finite = scan_finite  # check floats for NaN/Inf as chunks land (modelio/finite.py)
        self.tensors = tensors
        self._scan: FiniteScan | None = None
        self._reuse = buffer  # a uint8 buffer from an earlier stream of the same size: no page faults
        self.path = path
        self.journal_path = f"{path}.journal" if path is not None and journal else None
        self._journal: Any = None
        self.expected = expected
        self.alg = alg
        self.buffer: torch.Tensor | None = None
        self._view: np.ndarray | None = None
        self._populate = False  # a fresh anonymous buffer: its pages are mapped a chunk at a time before writing
        self.specs: list[serde.TensorSpec] = []
        self.data_start = 0
        self.metadata: dict[str, str] = {}
        self.header = b""
        self.offer: Offer | None = None
        self.peer = b""
        self.result: asyncio.Future[Received] = asyncio.get_running_loop().create_future()
        # An owner that must record what arrived before the sender may forget it (the broker: an update is
        # counted, or refused with a reason, before its site hears it was delivered) sets this future and
        # resolves it once recorded; the hub holds the ACK until then, so a crash never loses an acked stream.
        self.settled: asyncio.Future[None] | None = None

    def open(self, offer: Offer, *, resume: bool = False, inline: Sequence[memoryview] = ()) -> None:
        """Validate the untrusted header and allocate; raises RemoteProtocolError to refuse the stream.

        ``inline``: the stream's bytes, carried by its offer. One writable, 8-byte aligned frame holding all of
        them becomes the buffer itself (``_adopt``), where a copy would be the only thing the bytes need."""
        self.data_start, self.specs, self.metadata = serde.parse_header_cached(
            offer.header, max_total=self.max_total, total=offer.total
        )
        if self.data_start != len(offer.header):
            raise RemoteProtocolError("offer header must be exactly the stream's header bytes")
        if self.expected is not None:
            serde.check_compatible(self.expected, self.specs)
        self.header = offer.header
        self.offer = offer
        self.alg = offer.alg
        if self.scan_finite:
            self._scan = FiniteScan(self.specs, self.data_start)
        if not self._adopt(offer, inline):
            self._allocate(offer, resume)
        if self.journal_path is not None:
            self._journal = open(self.journal_path, "ab")  # noqa: SIM115 - lives as long as the stream
            if not resume:
                head = encode(offer)
                self._journal.write(struct.pack("<II", len(head), len(self.peer)) + head + self.peer)
                self._journal.flush()

    def record(self, off: int, length: int, chunk_sum: int) -> None:
        """Journal one verified chunk (after its bytes are in the mapped file)."""
        if self._journal is not None:
            self._journal.write(struct.pack("<QQQ", off, length, chunk_sum))
            self._journal.flush()

    @classmethod
    def reopen(
        cls, path: str, *, max_total: int, expected: Any = None
    ) -> tuple[BufferSink, list[tuple[int, int, int]]]:
        """Reopen a journaled stream left by a killed process: the sink and its verified chunks."""
        with open(f"{path}.journal", "rb") as f:
            data = f.read()
        try:
            head_len, peer_len = struct.unpack_from("<II", data)
            offer, _ = decode(data[8 : 8 + head_len])
            peer = data[8 + head_len : 8 + head_len + peer_len]
        except (struct.error, RemoteProtocolError) as exc:
            raise TransportError(f"journal of {path} is unreadable: {exc}") from exc
        if not isinstance(offer, Offer):
            raise TransportError(f"journal of {path} does not start with an offer")
        body = data[8 + head_len + peer_len :]
        body = body[: len(body) - len(body) % 24]  # a record torn by the kill is dropped
        triples = [struct.unpack_from("<QQQ", body, i) for i in range(0, len(body), 24)]
        sink = cls(max_total=max_total, expected=expected, path=path, journal=True)
        sink.peer = peer
        sink.open(offer, resume=True)
        return sink, triples

    def _adopt(self, offer: Offer, inline: Sequence[memoryview]) -> bool:
        """Take a small model's one inline frame (zmq's received message) as the buffer: no allocation, and
        ``write`` finds its bytes in place: a broker taking small updates from many sites allocates and fills
        no buffer per update. Tensors keep the frame alive.

        Only a frame under ``COPY_BELOW``: every sender copies those into memory of zmq's own. A larger one may
        have been sent zero-copy over ``inproc://`` (SimEnv), and its memory is then the sender's own object."""
        if self.path is not None or self._reuse is not None or len(inline) != 1:
            return False
        frame = inline[0]
        if frame.nbytes != offer.total or frame.nbytes >= COPY_BELOW or frame.readonly or not frame.c_contiguous:
            return False
        view = np.frombuffer(frame, dtype=np.uint8)
        if view.ctypes.data % 8:  # safetensors aligns tensors to 8 bytes within the file; keep them aligned here
            return False
        self.buffer, self._view = torch.from_numpy(view), view
        return True

    def _allocate(self, offer: Offer, resume: bool) -> None:
        reuse = self._reuse
        if self.path is None and reuse is not None and reuse.dtype == torch.uint8 and reuse.numel() == offer.total:
            self.buffer = reuse
        elif self.path is None:
            # Only a large buffer may go on huge pages: a small one skips the environment read per stream.
            huge = offer.total >= HUGE_BUFFER_MIN and placement_threads() > 0
            self.buffer = serde.allocate(offer.total, huge=huge)
            # Only a buffer of its own mapping has fresh pages to populate; a small one comes from the heap
            # (a system call per chunk of a small upload would cost a broker at many sites for nothing).
            self._populate = offer.total >= PLACEMENT_MIN
        else:
            if not resume:  # no O_TRUNC: a recycled file's pages (fedbus.recycle) are overwritten, not freed
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                try:
                    os.ftruncate(fd, offer.total)
                finally:
                    os.close(fd)
            self.buffer = torch.from_file(self.path, shared=True, size=offer.total, dtype=torch.uint8)
        self._view = self.buffer.numpy()

    def write(self, off: int, frames: Sequence[memoryview]) -> int:
        """Copy one chunk's frames into place and return the digest of what landed."""
        view = self._view
        assert view is not None and self.buffer is not None
        if self._populate:
            self._populate = populate_for_write(self.buffer.data_ptr() + off, sum(f.nbytes for f in frames))
        pos = off
        for f in frames:
            n = f.nbytes
            src = np.frombuffer(f, dtype=np.uint8)
            if src.ctypes.data != view.ctypes.data + pos:  # an adopted frame is in place already
                view[pos : pos + n] = src
            pos += n
        if self._scan is not None:
            self._scan.scan(off, frames)
        return digest.chunk_sum([view[off:pos]], self.alg)

    def nonfinite(self, read: Callable[[int, int], bytes]) -> list[str] | None:
        """What the finite scan found (``FiniteScan.result``), or None without one."""
        if self._scan is None or self.offer is None:
            return None
        return self._scan.result(self.offer.total, read)

    def finish(self) -> Received:
        """The received tensors, as views of the buffer; the stream's own header bytes must match the offer."""
        assert self._view is not None and self.buffer is not None
        if self._view[: len(self.header)].tobytes() != self.header:
            raise RemoteProtocolError("stream header bytes differ from the offered header")
        self.close()
        if self.journal_path is not None:
            os.unlink(self.journal_path)
        received = Received(serde.tensors_from_buffer(self.buffer, self.specs, self.data_start) if self.tensors else {})
        received.raw = self.buffer
        view = self._view
        received.nonfinite = self.nonfinite(lambda at, n: view[at : at + n].tobytes())
        return received

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None


class Received(dict[str, torch.Tensor]):
    """A received model: its tensors, views of one buffer, and ``raw``, that buffer: the exact bytes of the
    stream, a valid safetensors file (kept as they are, they need no laying out again). ``nonfinite``: the
    tensors the sink's finite scan found a NaN or Inf in ([]: none; None: not scanned)."""

    raw: torch.Tensor
    nonfinite: list[str] | None = None
