"""torch state_dict <-> safetensors layout, without copying tensor memory; the one safetensors user.

A model stream's bytes, concatenated, are a ``.safetensors`` file, byte for byte what
``safetensors.torch.save`` writes, so checkpoints, streams and downloads share one format:

    [8-byte little-endian header length n] [n bytes of JSON, space-padded to a multiple of 8] [data]

The JSON maps each name to ``{"dtype", "shape", "data_offsets": [start, end]}`` (offsets relative to
the data section) and may hold ``"__metadata__"`` (str -> str). Tensors are stored in safetensors'
order: by dtype, widest first (I64, F64, F32, I32, BF16, F16, I16, I8, U8, BOOL), then by name, so
every tensor starts at an offset aligned to its item size and can be viewed in place.

Sending (``layout``): the header is built from shapes and dtypes, and each tensor contributes a
memoryview of its own storage; nothing is concatenated. Copies happen only where they cannot be
avoided: a non-contiguous tensor is made contiguous, and a CUDA tensor is copied to host memory once.

Receiving: ``parse_header`` validates an untrusted header completely (every failure a ``HeaderError``
naming the problem and the tensor), ``allocate`` makes the one receive buffer, and
``tensors_from_buffer`` hands out tensors that are views of it.

Choices where safetensors offers none: ``__metadata__`` keys are written sorted (safetensors writes them
in hash order, which differs from run to run, so files with two or more metadata keys match it only up
to key order); tensors that share storage (tied weights) are each written as their own bytes, where
safetensors refuses them; an empty state_dict with empty metadata gives ``{"__metadata__":{}}``, where
safetensors 0.8 writes invalid JSON. Tensor bytes are taken as they lie in memory, which is the file's
little-endian order on every platform torch ships for.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import mmap
import os
import stat
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import torch

from fedbus._memory import populate_for_write
from fedbus.errors import ConfigError, HeaderError, LocalProtocolError, RemoteProtocolError
from fedbus.modelio.buffers import byte_view, fresh_buffer
from fedbus.recycle import FilePool

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "ITEMSIZE",
    "MAX_HEADER_BYTES",
    "Layout",
    "TensorSpec",
    "allocate",
    "check_compatible",
    "layout",
    "load_bytes",
    "parse_header",
    "read_file",
    "save_bytes",
    "tensors_from_buffer",
    "write_file",
]

# Listed in safetensors' own dtype order (its Rust ``Dtype`` enum), which decides the tensor order.
_ORDER: tuple[tuple[str, torch.dtype], ...] = (
    ("BOOL", torch.bool),
    ("U8", torch.uint8),
    ("I8", torch.int8),
    ("I16", torch.int16),
    ("F16", torch.float16),
    ("BF16", torch.bfloat16),
    ("I32", torch.int32),
    ("F32", torch.float32),
    ("F64", torch.float64),
    ("I64", torch.int64),
)
DTYPES: Mapping[str, torch.dtype] = MappingProxyType(dict(_ORDER))
"""safetensors dtype name -> torch dtype, for the dtypes fedbus streams."""
DTYPE_NAMES: Mapping[torch.dtype, str] = MappingProxyType({t: s for s, t in _ORDER})
"""torch dtype -> safetensors dtype name."""
ITEMSIZE: Mapping[str, int] = MappingProxyType({s: torch.empty((), dtype=t).element_size() for s, t in _ORDER})
_RANK = {s: i for i, (s, _) in enumerate(_ORDER)}

MAX_HEADER_BYTES = 100 << 20
"""Largest JSON header accepted (safetensors' own cap is 100 MB)."""
_MAX_NDIM = 64
_MAX_ELEMENTS = 1 << 48  # bound on the product of a shape's non-zero dims: no int64 overflow in torch
_METADATA = "__metadata__"
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a layout: its bytes are data section [start, end)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Layout:
    """A state_dict laid out as a safetensors file, as a list of buffers that are never joined.

    ``parts[0]`` is ``header`` (length prefix + padded JSON); then one read-only memoryview per tensor,
    in file order, over the tensor's own memory. The parts keep their tensors alive.
    """

    header: bytes
    specs: tuple[TensorSpec, ...]
    parts: list[memoryview]
    total: int
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return len(self.header)


def _q(name: object) -> str:
    """A name for an error message: quoted, and short even when the name is not."""
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- sending ---------------------------------------------------------------------------------------------


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise ConfigError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not (isinstance(k, str) and isinstance(v, str) and _is_utf8(k) and _is_utf8(v)):
            raise ConfigError(f"metadata entry {_q(k)}: keys and values must be (UTF-8 encodable) str")
    return dict(sorted(metadata.items()))


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """A read-only byte view of the tensor's data in C order: its own memory whenever possible."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()  # the one copy a strided tensor needs
    if t.device.type != "cpu":
        t = t.cpu()  # device-to-host: unavoidable, one copy per tensor
    flat = t.reshape(-1)  # a view: t is contiguous
    if flat.dtype is not torch.uint8:
        flat = flat.view(torch.uint8)  # reinterpret, no copy (covers bf16 and bool, unknown to numpy)
    return byte_view(flat).toreadonly()


def _encode_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    """The file's first bytes, as safetensors writes them (compact serde_json, space padding)."""
    obj: dict[str, Any] = {}
    if metadata is not None:
        obj[_METADATA] = dict(metadata)
    for s in specs:
        obj[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [s.start, s.end]}
    raw = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def layout(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Layout:
    """Lay ``state_dict`` out as a safetensors file without concatenating it. Raises ``ConfigError``."""
    plan = _plan(state_dict, metadata)
    parts = [_tensor_bytes(t) for t in plan.tensors]
    return Layout(plan.header, tuple(plan.specs), [memoryview(plan.header), *parts], plan.total, plan.metadata)


class _Plan(NamedTuple):
    """A state_dict's file, everything but the tensors' bytes: tensors and specs in file order, the header."""

    tensors: list[torch.Tensor]
    specs: list[TensorSpec]
    header: bytes
    metadata: dict[str, str]

    @property
    def total(self) -> int:
        return len(self.header) + (self.specs[-1].end if self.specs else 0)


def _plan(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> _Plan:
    """Validate ``state_dict`` and lay it out: names, dtypes, shapes and offsets, without touching its data."""
    if not isinstance(state_dict, Mapping):
        raise ConfigError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    meta = _check_metadata(metadata)
    entries: list[tuple[str, str, torch.Tensor]] = []
    for name, t in state_dict.items():
        if not isinstance(name, str) or not name or name == _METADATA or not _is_utf8(name):
            raise ConfigError(f"tensor name {_q(name)} must be a non-empty UTF-8 str other than {_METADATA!r}")
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"tensor {_q(name)} is a {type(t).__name__}, not a torch.Tensor")
        if t.layout is not torch.strided:
            raise ConfigError(f"tensor {_q(name)} is {t.layout}; make it dense first (.to_dense())")
        if t.device.type == "meta":
            raise ConfigError(f"tensor {_q(name)} is on the meta device and has no data")
        dtype = DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise ConfigError(f"tensor {_q(name)} has dtype {t.dtype}; supported: {', '.join(DTYPES)}")
        entries.append((name, dtype, t))
    entries.sort(key=lambda e: (-_RANK[e[1]], e[0]))  # str order = UTF-8 byte order, as in Rust

    specs: list[TensorSpec] = []
    offset = 0
    for name, dtype, t in entries:
        nbytes = t.numel() * t.element_size()
        specs.append(TensorSpec(name, dtype, tuple(t.shape), offset, offset + nbytes))
        offset += nbytes
    return _Plan([t for _, _, t in entries], specs, _encode_header(specs, meta), dict(meta or {}))


# --- receiving -------------------------------------------------------------------------------------------


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise HeaderError(f"header repeats the key {_q(key)}")
        obj[key] = value
    return obj


def _reject_constant(token: str) -> Any:
    raise HeaderError(f"header holds the non-JSON number {token}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(name: str, info: object) -> TensorSpec:
    where = f"tensor {_q(name)}"
    if not name:
        raise HeaderError("header has a tensor with an empty name")
    if not _is_utf8(name):
        raise HeaderError(f"{where}: name is not valid UTF-8")
    if not isinstance(info, dict):
        raise HeaderError(f"{where}: entry must be an object, got {type(info).__name__}")
    if set(info) != _ENTRY_KEYS:
        missing = sorted(_ENTRY_KEYS - set(info))
        extra = sorted(map(_q, set(info) - _ENTRY_KEYS))
        raise HeaderError(f"{where}: entry keys must be dtype, shape, data_offsets (missing {missing}, extra {extra})")
    dtype = info["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise HeaderError(f"{where}: unsupported dtype {_q(dtype)} (supported: {', '.join(DTYPES)})")
    shape = info["shape"]
    if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
        raise HeaderError(f"{where}: shape must be a list of at most {_MAX_NDIM} non-negative ints")
    numel, span = 1, 1
    for d in shape:
        numel *= d
        span *= max(d, 1)
        if span > _MAX_ELEMENTS:
            raise HeaderError(f"{where}: shape {_q(shape)} is too large")
    offsets = info["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise HeaderError(f"{where}: data_offsets must be two non-negative ints")
    start, end = offsets
    if end < start:
        raise HeaderError(f"{where}: data_offsets end {end} is before start {start}")
    itemsize = ITEMSIZE[dtype]
    if end - start != numel * itemsize:
        raise HeaderError(
            f"{where}: shape {shape} of {dtype} needs {numel * itemsize} bytes but data_offsets span {end - start}"
        )
    if start % itemsize:
        raise HeaderError(f"{where}: offset {start} is not aligned to the {itemsize}-byte {dtype} items")
    return TensorSpec(name, dtype, tuple(shape), start, end)


def read_header(
    fd: int, *, max_total: int, offset: int = 0, length: int | None = None
) -> tuple[int, list[TensorSpec], dict[str, str]]:
    """``parse_header`` of an open ``.safetensors`` file, reading only its header (two small preads); or of
    the ``length`` bytes at ``offset`` (one of many in a file, ``append_to``). Offsets are the blob's own."""
    size = os.fstat(fd).st_size - offset if length is None else length
    prefix = os.pread(fd, 8, offset)
    head_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
    head = prefix + os.pread(fd, min(head_len, MAX_HEADER_BYTES, size), offset + 8)
    return parse_header(head, max_total=max_total, total=size)


def parse_header(
    data: bytes | bytearray | memoryview, *, max_total: int, total: int | None = None
) -> tuple[int, list[TensorSpec], dict[str, str]]:
    """Validate an untrusted safetensors header: ``(data_start, specs in file order, metadata)``.

    ``data`` starts with the 8-byte length prefix and holds at least the whole JSON. ``total`` is the
    announced stream length, when known; the tensors must end exactly there. Every failure is a
    ``HeaderError`` naming the problem and, where there is one, the tensor.
    """
    mv = memoryview(data)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    if mv.nbytes < 8:
        raise HeaderError(f"stream of {mv.nbytes} bytes is shorter than the 8-byte header length prefix")
    n = int.from_bytes(mv[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise HeaderError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap")
    if n > mv.nbytes - 8:
        raise HeaderError(f"header length {n} runs past the {mv.nbytes - 8} header bytes available")
    if n % 8:
        raise HeaderError(f"header length {n} is not a multiple of 8, so tensor data would be misaligned")
    data_start = 8 + n
    if total is not None:
        if not _is_int(total) or total < data_start:
            raise HeaderError(f"stream length {total!r} cannot hold the {data_start}-byte header")
        if total > max_total:
            raise HeaderError(f"stream length {total} exceeds the {max_total}-byte cap")
    try:
        text = bytes(mv[8:data_start]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"header is not valid UTF-8 ({exc.reason} at byte {8 + exc.start})") from exc
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge int literals, deep nesting
        raise HeaderError(f"header is not valid JSON: {str(exc)[:200]}") from exc
    if not isinstance(obj, dict):
        raise HeaderError(f"header must be a JSON object, got {type(obj).__name__}")

    metadata = obj.pop(_METADATA, {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _is_utf8(k) and _is_utf8(v) for k, v in metadata.items()
    ):
        raise HeaderError(f"{_METADATA} must be an object of str to str")
    specs = [_parse_entry(name, info) for name, info in obj.items()]
    specs.sort(key=lambda s: (s.start, s.end))  # stable: ties (empty tensors) keep header order

    pos = 0
    for s in specs:
        if s.start < pos:
            raise HeaderError(f"tensor {_q(s.name)} at [{s.start}, {s.end}) overlaps data that ends at {pos}")
        if s.start > pos:
            raise HeaderError(f"tensor {_q(s.name)} starts at {s.start}, leaving a gap after {pos}")
        pos = s.end
    end = data_start + pos
    if total is not None and end != total:
        raise HeaderError(f"tensors end at byte {end} but the stream is {total} bytes long")
    if end > max_total:
        raise HeaderError(f"tensors need {end} bytes, over the {max_total}-byte cap")
    return data_start, specs, metadata


def allocate(total: int, *, huge: bool = False) -> torch.Tensor:
    """The one uint8 receive buffer of a stream (uninitialised: every byte is written before use).

    A fresh buffer costs a page fault per 4 KiB page on its first write, which dominates a cold receive;
    ``huge`` puts a large one on transparent huge pages (``modelio.buffers.fresh_buffer`` says when that pays).
    Callers that receive repeatedly should reuse buffers (the warm path).
    """
    if not _is_int(total) or total < 0:
        raise LocalProtocolError(f"buffer size must be a non-negative int, got {total!r}")
    return fresh_buffer(total, huge=huge)


def tensors_from_buffer(buf: torch.Tensor, specs: Iterable[TensorSpec], data_start: int) -> dict[str, torch.Tensor]:
    """Tensors that are views of ``buf`` (no copies), from specs validated by ``parse_header``.

    BOOL tensors are checked to hold only 0 and 1 bytes (torch assumes it; the bytes are untrusted).
    """
    if buf.dtype is not torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise LocalProtocolError("the receive buffer must be a contiguous 1-D uint8 tensor")
    out: dict[str, torch.Tensor] = {}
    for s in specs:
        lo, hi = data_start + s.start, data_start + s.end
        if hi > buf.numel():
            raise LocalProtocolError(f"tensor {_q(s.name)} ends at byte {hi}, past the {buf.numel()}-byte buffer")
        raw = buf[lo:hi]
        if s.dtype == "BOOL" and raw.numel() and bool(raw.gt(1).any()):
            raise RemoteProtocolError(f"tensor {_q(s.name)}: BOOL data holds bytes other than 0 and 1")
        try:
            out[s.name] = raw.view(DTYPES[s.dtype]).view(s.shape)
        except RuntimeError as exc:  # misaligned buffer: a caller bug, since parse_header checked offsets
            raise LocalProtocolError(f"tensor {_q(s.name)} cannot be viewed in place: {exc}") from exc
    return out


def parse_header_cached(
    data: bytes | bytearray | memoryview, *, max_total: int, total: int | None = None
) -> tuple[int, list[TensorSpec], dict[str, str]]:
    """``parse_header``, remembered for the last few distinct headers (as bytes).

    Headers repeat: every update of a job, and every download of a version, carries the global model's layout.
    Validating one is Python work on the receiver's event loop, per stream, and grows with the tensors (tens of ms for
    an LLM's thousands); remembering costs a hash of the bytes (docs/benchmarks.md). Only a header that passed is
    remembered (a refusal is not cached, so it raises every time), at most 16 of them; the caller gets its own list and
    dict.
    """
    if not isinstance(data, bytes):
        return parse_header(data, max_total=max_total, total=total)
    data_start, specs, metadata = _parse_header_bytes(data, max_total, total)
    return data_start, list(specs), dict(metadata)


@functools.lru_cache(maxsize=16)
def _parse_header_bytes(
    data: bytes, max_total: int, total: int | None
) -> tuple[int, tuple[TensorSpec, ...], tuple[tuple[str, str], ...]]:
    data_start, specs, metadata = parse_header(data, max_total=max_total, total=total)
    return data_start, tuple(specs), tuple(metadata.items())


ANY_LENGTH = (-1,)
"""A reference ``TensorSpec``'s shape that takes a 1-D tensor of any length (an encrypted tensor's bytes)."""


def check_compatible(reference: Any, specs: Any) -> None:
    """Raise ``HeaderError`` unless ``specs`` has exactly the names, shapes and dtypes of ``reference``.

    Each side may be a state_dict, a ``Layout`` or an iterable of ``TensorSpec``; a reference spec of shape
    ``ANY_LENGTH`` takes any 1-D shape.
    """
    want, got = _signature(reference), _signature(specs)
    problems: list[str] = []
    missing = [n for n in want if n not in got]
    extra = [n for n in got if n not in want]
    if missing:
        problems.append("missing " + _names(missing))
    if extra:
        problems.append("unexpected " + _names(extra))
    for name, (dtype, shape) in got.items():
        if name not in want:
            continue
        ref_dtype, ref_shape = want[name]
        if dtype != ref_dtype:
            problems.append(f"{_q(name)} has dtype {dtype}, expected {ref_dtype}")
        if shape != ref_shape and not (ref_shape == ANY_LENGTH and len(shape) == 1):
            problems.append(f"{_q(name)} has shape {list(shape)}, expected {list(ref_shape)}")
    if problems:
        shown = problems[:8] + ([f"and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise HeaderError("model does not match the reference: " + "; ".join(shown))


def _names(names: list[str]) -> str:
    shown = ", ".join(_q(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _signature(x: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    if isinstance(x, Layout):
        x = x.specs
    if isinstance(x, Mapping):
        out = {}
        for name, t in x.items():
            if isinstance(t, TensorSpec):
                out[name] = (t.dtype, t.shape)
            else:
                out[name] = (DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape))
        return out
    return {s.name: (s.dtype, tuple(s.shape)) for s in x}


# --- bytes and files -------------------------------------------------------------------------------------


def save_bytes(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors file of ``state_dict`` as one bytes object (one copy: for tests and small models)."""
    return b"".join(layout(state_dict, metadata).parts)


def load_bytes(data: bytes | bytearray | memoryview, *, max_total: int | None = None) -> dict[str, torch.Tensor]:
    """Tensors from a whole safetensors file in memory: validated, copied once into a fresh buffer."""
    mv = memoryview(data).cast("B")
    data_start, specs, _ = _parse_whole(mv, max_total)
    buf = allocate(mv.nbytes)
    buf.numpy()[:] = np.frombuffer(mv, dtype=np.uint8)
    return tensors_from_buffer(buf, specs, data_start)


def _parse_whole(mv: memoryview, max_total: int | None) -> tuple[int, list[TensorSpec], dict[str, str]]:
    return parse_header(mv, max_total=mv.nbytes if max_total is None else max_total, total=mv.nbytes)


def append_to(fd: int, parts: Sequence[memoryview], *, align: int = 64) -> int:
    """Append ``parts`` (a ``Layout``'s, say) to the open file ``fd`` at the next multiple of ``align`` bytes;
    returns that offset.

    Many small models in one file: creating a file per model is a real share of the time of a broker keeping
    hundreds of small updates a second; appending costs almost nothing.
    """
    end = os.lseek(fd, 0, os.SEEK_END)
    pad = -end % align
    _write_all(fd, [memoryview(bytes(pad)), *parts])
    return end + pad


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd`` (``pwrite`` may write less than asked)."""
    while data.nbytes:
        n = os.pwrite(fd, data, offset)
        if n <= 0:
            raise OSError(f"pwrite returned {n}")
        data, offset = data[n:], offset + n


def _write_all(fd: int, parts: Iterable[memoryview]) -> None:
    """Write every part, in order, with as few system calls as the kernel allows; no concatenation."""
    pending = collections.deque(v for v in (memoryview(p).cast("B") for p in parts) if v.nbytes)
    iov_max = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "writev") else 1
    while pending:
        batch = list(itertools.islice(pending, iov_max))
        written = os.writev(fd, batch) if iov_max > 1 else os.write(fd, batch[0])
        if written <= 0:
            raise OSError(f"write returned {written}")
        while written:  # drop what was written, trim a partly written part
            head = pending[0]
            if written >= head.nbytes:
                written -= head.nbytes
                pending.popleft()
            else:
                pending[0] = head[written:]
                written = 0


def _copy_into_file(fd: int, plan: _Plan) -> None:
    """Fill an empty file with a state_dict whose tensors live on a device or are strided: each is copied
    once, straight into the file's pages (no host staging copy of the model, no second copy by write()).
    CUDA tensors go through ``staging``'s pinned buffers, several segments in flight."""
    os.ftruncate(fd, plan.total)
    start = len(plan.header)
    if plan.total == start:
        os.pwrite(fd, plan.header, 0)
        return
    if any(t.device.type == "cuda" for t in plan.tensors):
        _stage_into_file(fd, plan)
        return
    mem = mmap.mmap(fd, plan.total)
    try:
        buf = torch.frombuffer(mem, dtype=torch.uint8)
        buf[:start] = torch.frombuffer(bytearray(plan.header), dtype=torch.uint8)
        for t, spec in zip(plan.tensors, plan.specs, strict=True):
            if spec.end > spec.start:
                buf[start + spec.start : start + spec.end].view(t.dtype).view(t.shape).copy_(t.detach())
        del buf
    finally:
        mem.close()


def _stage_into_file(fd: int, plan: _Plan) -> None:
    """``_copy_into_file`` for a state_dict with CUDA tensors: those through the pinned staging buffers (one device
    at a time), host tensors by ``pwrite``; the header first."""
    from fedbus.modelio import staging

    start = len(plan.header)
    os.pwrite(fd, plan.header, 0)
    by_device: dict[torch.device, tuple[list[torch.Tensor], list[int]]] = {}
    for t, spec in zip(plan.tensors, plan.specs, strict=True):
        if spec.end == spec.start:
            continue
        if t.device.type == "cuda":
            tensors, offsets = by_device.setdefault(t.device, ([], []))
            tensors.append(t if t.is_contiguous() else t.contiguous())
            offsets.append(start + spec.start)
        else:
            _pwrite_all(fd, _tensor_bytes(t).cast("B"), start + spec.start)
    for tensors, offsets in by_device.values():
        staging.device_to_file(fd, tensors, offsets)


def write_file(
    path: str | os.PathLike[str],
    lay: Layout | Mapping[str, torch.Tensor],
    *,
    durable: bool = True,
    recycle: FilePool | None = None,
) -> None:
    """Write a layout (or a state_dict) as a safetensors file, atomically and (by default) durably.

    The parts go to a temporary file in the same directory (mode 0600), which is renamed over ``path``:
    a reader never sees half a file. ``durable`` adds the fsyncs (file, then directory) that make a
    checkpoint survive a power cut; a hand-over file that lives for seconds (a script's result on its
    way to the site) skips them, since they cost a disk flush of the whole model. A state_dict with tensors
    on a GPU (or strided ones) is copied straight into the file's mapped pages, tensor by tensor: the one
    host copy the transfer needs (``fedbus bench transfer --device cuda`` measures it). With ``recycle`` the
    temporary file is a released file of that pool when it has one (``fedbus.recycle``: its page cache is
    overwritten, not allocated again).
    """
    to_map: _Plan | None = None
    if not isinstance(lay, Layout):
        if any(isinstance(t, torch.Tensor) and (t.device.type != "cpu" or not t.is_contiguous()) for t in lay.values()):
            to_map = _plan(lay, None)
        else:
            lay = layout(lay)
    target = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(target)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(target) + ".", suffix=".tmp")
    try:
        try:
            if recycle is not None and recycle.take(tmp):
                os.close(fd)
                fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW)
            if to_map is not None:
                _copy_into_file(fd, to_map)
            else:
                _write_all(fd, lay.parts)  # type: ignore[union-attr]
                os.ftruncate(fd, lay.total)  # type: ignore[union-attr]  # a recycled file may have been longer
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if not durable:
        return
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_generated(
    path: str | os.PathLike[str],
    shapes: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    fill: Callable[[str, torch.Tensor], object],
) -> int:
    """Create a safetensors file of tensors named and shaped by ``shapes``, ``fill(name, tensor)`` writing each one's
    values where it lies in the file's mapping: a model generated straight into its file, never held in memory
    beside it (a benchmark's 13 GB model, say). Filling the mapping cost less CPU than filling a reused buffer and
    writing it (docs/benchmarks.md). Not atomic and not durable: for files nothing reads until this returns.
    Returns the file's size."""
    entries: list[tuple[str, str, torch.dtype, tuple[int, ...]]] = []
    for name, (dtype, shape) in shapes.items():
        if dtype not in DTYPE_NAMES:
            raise ConfigError(f"tensor {_q(name)} has dtype {dtype}; supported: {', '.join(DTYPES)}")
        entries.append((name, DTYPE_NAMES[dtype], dtype, tuple(shape)))
    entries.sort(key=lambda e: (-_RANK[e[1]], e[0]))  # as _plan: safetensors' order
    specs: list[TensorSpec] = []
    offset = 0
    for name, dname, _, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dname]
        specs.append(TensorSpec(name, dname, shape, offset, offset + nbytes))
        offset += nbytes
    header = _encode_header(specs, None)
    total = len(header) + offset
    with open(path, "wb+") as f:
        f.write(header)
        f.truncate(total)
        if not offset:
            return total
        mem = mmap.mmap(f.fileno(), total)
    try:
        buf = torch.frombuffer(mem, dtype=torch.uint8)
        for (name, _, dtype, shape), spec in zip(entries, specs, strict=True):
            if spec.nbytes:
                view = buf[len(header) + spec.start : len(header) + spec.end].view(dtype).view(shape)
                fill(name, view)
                del view
        del buf
    finally:
        mem.close()
    return total


def read_file(path: str | os.PathLike[str], *, max_total: int | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file: read once into one buffer, validated, returned as views of it.

    A large buffer goes on huge pages: a training script reads one model per round, and once the kernel has
    free huge pages (after the first read) the fresh buffer's faults cost about half."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if max_total is not None and size > max_total:
            raise HeaderError(f"file of {size} bytes exceeds the {max_total}-byte cap")
        buf = allocate(size, huge=True)
        view = byte_view(buf)
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                raise HeaderError(f"file ended after {got} of {size} bytes")
            got += n
    data_start, specs, _ = _parse_whole(view, max_total)
    return tensors_from_buffer(buf, specs, data_start)


def map_file(
    path: str | os.PathLike[str], *, max_total: int | None = None
) -> tuple[dict[str, torch.Tensor], mmap.mmap]:
    """Tensors of a safetensors file as views of a shared, writable mapping of it, and the mapping.

    No copy: a write to a tensor is a write to the file's page cache, and the file is whatever the tensors hold. The
    pages are mapped for writing up front in one system call (``MADV_POPULATE_WRITE``), so neither the first read nor
    the first write of a page traps: a script's model is ready in a small fraction of the time reading it into fresh
    memory takes (docs/benchmarks.md). The mapping lives as long as the last view of it (``torch.frombuffer`` keeps it
    alive).
    """
    fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HeaderError(f"{os.fspath(path)} is not a regular file")
        if max_total is not None and st.st_size > max_total:
            raise HeaderError(f"file of {st.st_size} bytes exceeds the {max_total}-byte cap")
        if st.st_size < 8:
            raise HeaderError(f"file of {st.st_size} bytes is too short for a safetensors header")
        mem = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    buf = torch.frombuffer(mem, dtype=torch.uint8)
    populate_for_write(buf.data_ptr(), buf.numel())
    data_start, specs, _ = _parse_whole(byte_view(buf), max_total)
    return tensors_from_buffer(buf, specs, data_start), mem
