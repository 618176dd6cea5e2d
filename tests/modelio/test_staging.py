"""GPU models to and from host files through pinned staging buffers: the segmenting (pure) everywhere, the copies
on a CUDA device (skipped without one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedbus.bench.common import llama_shapes, write_model_file
from fedbus.client._files import load_params, save_params, take_params
from fedbus.modelio import serde, staging
from fedbus.modelio.staging import Piece, segments

pytestmark = pytest.mark.timeout(60)

NO_CUDA = "no CUDA device: the staged device copies need one"


@pytest.mark.parametrize("sizes", [[], [0], [10], [3, 0, 7, 1], [25], [4, 4, 4, 4], [1] * 9, [9, 1, 30]])
def test_segments_cover_every_byte_once_in_order(sizes: list[int]) -> None:
    stage = 8
    segs = list(segments(sizes, stage))
    assert all(0 < sum(p.nbytes for p in seg) <= stage for seg in segs)
    assert all(seg[-1].at + seg[-1].nbytes == sum(p.nbytes for p in seg) for seg in segs)  # packed from 0
    covered: list[tuple[int, int]] = [(p.item, p.start + k) for seg in segs for p in seg for k in range(p.nbytes)]
    assert covered == [(i, b) for i, n in enumerate(sizes) for b in range(n)]
    # only the last segment may be short
    assert all(sum(p.nbytes for p in seg) == stage for seg in segs[:-1])


def test_a_small_item_shares_a_segment_and_a_large_one_is_split() -> None:
    assert list(segments([3, 20], 8)) == [
        [Piece(0, 0, 3, 0), Piece(1, 0, 5, 3)],
        [Piece(1, 5, 8, 0)],
        [Piece(1, 13, 7, 0)],
    ]
    with pytest.raises(ValueError, match="stage must be positive"):
        list(segments([1], 0))


def test_a_generated_model_is_its_layout_in_the_file(tmp_path: Path) -> None:
    shapes = llama_shapes(layers=2, width=64, ffn=172, vocab=100)
    size = write_model_file(tmp_path / "m.safetensors", shapes)
    got = serde.read_file(tmp_path / "m.safetensors")
    assert size == (tmp_path / "m.safetensors").stat().st_size
    assert {k: (t.dtype, tuple(t.shape)) for k, t in got.items()} == shapes
    assert len(got) == 3 + 2 * 9 and got["model.layers.1.mlp.down_proj.weight"].shape == (64, 172)
    w = got["model.layers.0.self_attn.q_proj.weight"].float()
    assert 0.01 < w.std() < 0.04 and w.abs().max() > 0  # random weights at an initialised transformer's scale
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], got["model.layers.0.self_attn.k_proj.weight"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_a_cuda_model_round_trips_bit_exactly_through_the_hand_over_file(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(7)
    host = {  # sizes that cross segment borders, tiny and empty tensors, a strided one, several dtypes
        "big": torch.randn(staging.STAGE // 2 + 12345, generator=gen).to(torch.bfloat16),
        "mid": torch.randn(3, staging.STAGE // 8 + 1, generator=gen),
        "tiny": torch.randn(3, generator=gen).to(torch.float16),
        "empty": torch.empty(0, 4),
        "ints": torch.randint(-(2**40), 2**40, (1000,), generator=gen),
        "flags": torch.rand(77, generator=gen) > 0.5,
        "strided": torch.randn(64, 48, generator=gen).t(),
    }
    on_gpu = {k: v.cuda() for k, v in host.items()}
    save_params(tmp_path / "out" / "model.safetensors", on_gpu)  # flare.send's path
    back = load_params(tmp_path / "out" / "model.safetensors")
    for k, v in host.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].contiguous().view(torch.uint8), v.contiguous().view(torch.uint8)), k
    taken = take_params(tmp_path / "out" / "model.safetensors")  # flare.receive's path, then onto the device
    again = staging.to_device(taken.params, "cuda")
    for k, v in on_gpu.items():
        assert again[k].device.type == "cuda" and again[k].shape == v.shape
        assert torch.equal(again[k].contiguous().view(torch.uint8), v.contiguous().view(torch.uint8)), k


def test_to_device_refuses_a_host_target() -> None:
    with pytest.raises(ValueError, match="CUDA device"):
        staging.to_device({"a": torch.zeros(1)}, "cpu")
