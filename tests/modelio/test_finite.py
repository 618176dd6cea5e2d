"""The finite scan on arrival (modelio/finite.py) says exactly which tensors hold a NaN or Inf, however
the stream is cut into chunks and frames (elements split between frames included), and says nothing when
some bytes were never scanned."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from fedbus.modelio import serde
from fedbus.modelio.finite import FiniteScan
from fedbus.strategy.base import validate_update
from tests.modelio.sinks import fill

pytestmark = pytest.mark.timeout(60)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8, torch.bool]


def _model(rng: random.Random) -> dict[str, torch.Tensor]:
    model = {}
    for i in range(rng.randint(1, 6)):
        dtype = rng.choice(DTYPES)
        n = rng.choice([1, 3, 17, 1000, rng.randint(1, 5000)])
        t = torch.randn(n, dtype=torch.float64) * 10
        model[f"t{i}"] = t.to(dtype) if dtype.is_floating_point else (t.abs() % 100).to(dtype)
    return model


def _frames(data: bytes, rng: random.Random) -> list[tuple[int, list[memoryview]]]:
    """The stream cut into chunks at random byte offsets, each chunk into 1-3 frames at random offsets."""
    cuts = sorted({0, len(data), *(rng.randrange(len(data)) for _ in range(rng.randint(0, 8)))})
    chunks = []
    for a, b in itertools.pairwise(cuts):
        inner = sorted({a, b, *(rng.randrange(a, b) for _ in range(rng.randint(0, 2)))})
        chunks.append((a, [memoryview(data[x:y]) for x, y in itertools.pairwise(inner)]))
    return chunks


@pytest.mark.parametrize("seed", range(60))
def test_the_scan_names_exactly_the_tensors_with_a_non_finite_value(seed: int) -> None:
    rng = random.Random(seed)
    model = _model(rng)
    floats = [k for k, t in model.items() if t.is_floating_point()]
    poisoned = set(rng.sample(floats, rng.randint(0, len(floats))))
    for name in poisoned:
        t = model[name]
        t[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
    if seed % 5 == 0 and floats:  # finite values whose sum overflows: not a NaN
        model[floats[0]] = torch.full_like(model[floats[0]], torch.finfo(model[floats[0]].dtype).max)
        poisoned.discard(floats[0])
    lay = serde.layout(model)
    data = b"".join(bytes(p) for p in lay.parts)
    scan = FiniteScan(lay.specs, len(lay.header))
    chunks = _frames(data, rng)
    rng.shuffle(chunks)  # chunks land in any order (placement threads)
    for off, frames in chunks:
        scan.scan(off, frames)
    want = [s.name for s in lay.specs if s.name in poisoned]
    assert scan.result(len(data), lambda at, n: data[at : at + n]) == want
    torch_says = validate_update(model, model)
    assert (torch_says is None) == (not want)


def test_a_chunk_written_again_replaces_its_first_copy_and_a_gap_gives_no_answer() -> None:
    model = {"w": torch.ones(4096), "b": torch.ones(10)}
    lay = serde.layout(model)
    data = bytearray(b"".join(bytes(p) for p in lay.parts))
    half = len(data) // 2 + 3  # mid-element
    w = next(s for s in lay.specs if s.name == "w")
    at = len(lay.header) + w.start + 4 * 5  # element 5 of w, in the first half
    corrupt = bytearray(data)
    corrupt[at : at + 4] = torch.tensor([float("nan")]).numpy().tobytes()
    scan = FiniteScan(lay.specs, len(lay.header))
    scan.scan(0, [memoryview(bytes(corrupt[:half]))])  # corrupted in flight: NACKed, then sent again
    assert scan.result(len(data), lambda at, n: bytes(data[at : at + n])) is None  # the second half is missing
    scan.scan(half, [memoryview(bytes(data[half:]))])
    assert scan.result(len(data), lambda at, n: bytes(data[at : at + n])) == ["w"]
    scan.scan(0, [memoryview(bytes(data[:half]))])
    assert scan.result(len(data), lambda at, n: bytes(data[at : at + n])) == []


async def test_a_received_update_carries_the_answer_and_validation_uses_it(tmp_path) -> None:
    from fedbus.modelio.sinks import BufferSink
    from fedbus.modelio.spool import SpoolSink

    model = {"w": torch.randn(100_000), "h": torch.randn(333).half()}
    model["h"][7] = float("inf")
    lay = serde.layout(model)
    for sink in (
        BufferSink(max_total=1 << 30, scan_finite=True),
        SpoolSink(path=str(tmp_path / "u.part"), max_total=1 << 30, scan_finite=True),
    ):
        params = fill(sink, lay, chunk=1 << 16)
        assert params.nonfinite == ["h"]
        assert validate_update(model, params) == "non-finite values (NaN/Inf) in 'h'"
        getattr(params, "release", lambda: None)()
