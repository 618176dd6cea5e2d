"""SpooledParams: big tensors are views of a shared map of the spooled file, small ones are read."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fedbus.modelio import serde
from fedbus.modelio.spool import MAP_MIN, SpooledParams, open_params
from tests.modelio.sinks import fill


def _spooled(path: Path, model: dict[str, torch.Tensor]) -> SpooledParams:
    serde.write_file(path, model, durable=False)
    fd = os.open(path, os.O_RDWR)
    data_start, specs, _ = serde.read_header(fd, max_total=1 << 30)
    return SpooledParams(fd, str(path), specs, data_start)


def test_mapped_and_read_tensors_hold_the_spooled_values_after_release(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    model = {
        "big": torch.randn(MAP_MIN // 4 + 3, generator=gen),  # mapped (odd length: the map is not page-sized)
        "small": torch.randn(7, generator=gen),  # read
        "ints": torch.arange(MAP_MIN // 8 + 1, dtype=torch.int64).view(-1, 1),
        "empty": torch.empty(0, 3),
    }
    params = _spooled(tmp_path / "u.part", model)
    got = {name: params[name] for name in params}
    params.release()
    assert not (tmp_path / "u.part").exists()  # an owned spool file goes with its release
    for name, t in model.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name], t), name  # the mapping outlives the file's name and descriptor


def test_read_only_files_are_read_not_mapped(tmp_path: Path) -> None:
    model = {"big": torch.ones(MAP_MIN // 4 * 2)}
    serde.write_file(tmp_path / "m.safetensors", model, durable=False)
    params = open_params(tmp_path / "m.safetensors", max_total=1 << 30)
    t = params["big"]
    params.release()
    t.add_(1)  # a private copy: the checkpoint file is untouched
    assert torch.equal(serde.read_file(tmp_path / "m.safetensors")["big"], model["big"])


async def test_released_spool_files_are_recycled_unless_a_mapping_is_alive(tmp_path: Path) -> None:
    from fedbus.modelio.spool import SpoolSink
    from fedbus.recycle import FilePool

    pool = FilePool(tmp_path, keep=1)

    def receive(name: str, model: dict[str, torch.Tensor]) -> SpooledParams:
        return fill(SpoolSink(path=str(tmp_path / name), max_total=1 << 30, pool=pool), serde.layout(model))

    a = {"w": torch.full((MAP_MIN // 4,), 1.0)}
    first = receive("a.part", a)
    inode = os.stat(tmp_path / "a.part").st_ino
    assert torch.equal(first["w"], a["w"])
    first.release()  # no tensor of it is alive: the file waits for the next upload
    assert not (tmp_path / "a.part").exists()
    b = {"w": torch.full((MAP_MIN // 4,), 2.0)}
    second = receive("b.part", b)
    assert os.stat(tmp_path / "b.part").st_ino == inode  # the same file, its pages overwritten
    held = second["w"]
    second.release()  # a tensor still maps it: deleted, not recycled, so its data cannot change
    assert not (tmp_path / "b.part").exists() and not pool.free()
    third = receive("c.part", {"w": torch.full((MAP_MIN // 4,), 3.0)})
    assert torch.equal(held, b["w"]) and os.stat(tmp_path / "c.part").st_ino != inode
    third.release()
    pool.clear()
    assert list(tmp_path.iterdir()) == []


def test_a_kept_spool_file_moves_and_outlives_its_release(tmp_path: Path) -> None:
    """An accepted update the broker must keep until its aggregate is checkpointed: renamed, never deleted."""
    model = {"big": torch.arange(MAP_MIN // 4 + 5, dtype=torch.float32), "small": torch.ones(3)}
    params = _spooled(tmp_path / "u.part", model)
    big = params["big"]  # mapped before the move: still valid after it
    assert params.keep_as(tmp_path / "kept.safetensors")
    params.release()
    assert not (tmp_path / "u.part").exists() and torch.equal(big, model["big"])
    again = open_params(tmp_path / "kept.safetensors", max_total=1 << 30)
    assert all(torch.equal(again[k], t) for k, t in model.items())
    again.release()
    assert not again.keep_as(tmp_path / "x.safetensors")  # not an owned spool file: the caller writes a copy


def test_membership_and_description_read_no_tensor_data(tmp_path: Path) -> None:
    # validate_update asks ``name in params`` for every tensor: Mapping's default answers by loading the
    # tensor (a 512 MiB model mapped and dropped once more per update). Cut the data off to prove it is not read.
    model = {"big": torch.ones(MAP_MIN // 4 * 2), "small": torch.ones(3)}
    params = _spooled(tmp_path / "u.part", model)
    os.truncate(params.path, 64)
    assert "big" in params and "small" in params and "other" not in params
    assert params.describe("big").shape == model["big"].shape
    try:
        params["small"]
    except Exception as exc:  # the data really is gone: a load fails, membership did not try one
        assert "truncated" in str(exc)
    else:
        raise AssertionError("reading a cut-off tensor should fail")
    params.release()
