"""Model files on the local link: the site and the script hand each other ``.safetensors`` paths.

Why files and not frames: a model handed over through the page cache costs one write and no socket
copies, the training script's memory is never doubled by a serialized copy sitting in a socket buffer,
and the file the site streams to the broker is byte for byte the file the script wrote. ``fedbus.modelio.serde``
does the work: it validates the header of what it reads, and writes tensor by tensor (no concatenated
copy) into a temporary file that is renamed into place, so the site never sees half a model (no fsync:
the file lives for seconds, and a crash of the machine loses the task anyway). The temporary file is one the
site released after an earlier upload, when there is one (``fedbus.recycle``: a fraction of the CPU to write).

A task's file the site lets go (``Task.take``: no privacy filter needs its bytes at upload) is *taken*:
renamed out of the site's reach (``inbox/.held-*``) and mapped shared (``serde.map_file``). FULL: receiving copies
nothing, and a script that trains the received tensors in place (``load_state_dict(..., assign=True)``, or
updating them directly) sends a result that is that very file, linked into the outbox: no write at all. DIFF: the
script trains a copy, and ``local - base`` is computed into the mapped base, which is then the result: the base
read once instead of twice, and no result written: reading the model and writing the result were most of a
script's turn in a round. Once the last
view of the mapping is gone the file goes back to the inbox's pool (``fedbus.recycle``) for a later download; a
file still linked elsewhere (an upload kept for resuming) is only unlinked, so a recycled file is never one a
live tensor or an upload reads.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import weakref
from collections.abc import Mapping
from pathlib import Path

import torch

from fedbus.errors import FedbusError, JobError
from fedbus.modelio import serde
from fedbus.recycle import HELD_PREFIX, FilePool


def load_params(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file the site handed over, on the CPU."""
    try:
        return serde.read_file(path)
    except FileNotFoundError as exc:
        raise JobError(f"model file {path} is missing") from exc
    except (FedbusError, OSError) as exc:
        raise JobError(f"cannot read model file {path}: {exc}") from exc


def save_params(path: Path, params: Mapping[str, torch.Tensor]) -> None:
    """Write ``params`` to ``path`` atomically (a reader never sees a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # GPU tensors: copied once, device to the file's pages
    serde.write_file(path, params, durable=False, recycle=FilePool(path.parent))


class TakenFile:
    """A task's model file the script holds, its tensors views of a shared mapping of it (``params``).

    FULL: ``params`` are what ``receive()`` hands the script; if the script sends them back trained in place,
    the file is the result as it is (``link_as``). DIFF: the script gets a private copy and ``params`` stay the
    base; ``diff_in_place`` writes ``local - base`` over the base, and the file is again the result (``link``).
    """

    def __init__(self, held: Path, params: dict[str, torch.Tensor]) -> None:
        self.held = held
        self.params = params

    def link_as(self, params: Mapping[str, torch.Tensor], dest: Path) -> bool:
        """Link the file as ``dest`` when ``params`` are exactly its tensors (trained in place): the file then
        holds the result already. False otherwise, and the caller writes ``params`` out."""
        if params.keys() != self.params.keys():
            return False
        for name, t in params.items():
            mine = self.params[name]
            if t.device.type != "cpu" or t.dtype != mine.dtype or t.shape != mine.shape or not t.is_contiguous():
                return False
            if t.data_ptr() != mine.data_ptr():
                return False
        return self.link(dest)

    def diff_in_place(self, local: Mapping[str, torch.Tensor]) -> bool:
        """Write ``local - base`` over the base tensors (``params`` then hold the DIFF and the file is that
        result): no allocation and no write. False, with nothing changed, unless ``local`` has the base's names,
        shapes and dtypes in memory of its own; the caller then computes the difference against ``params``."""
        if local.keys() != self.params.keys():
            return False
        storage = next(iter(self.params.values())).untyped_storage().data_ptr() if self.params else 0
        for name, t in local.items():
            base = self.params[name]
            if t.device.type != "cpu" or t.dtype != base.dtype or t.shape != base.shape or t.dtype == torch.bool:
                return False
            if t.untyped_storage().data_ptr() == storage:  # a view of the base itself: would change under us
                return False
        for name, t in local.items():
            torch.sub(t, self.params[name], out=self.params[name])  # what diff_params computes, into the file
        return True

    def link(self, dest: Path) -> bool:
        """Make ``dest`` a hard link of the file (False where the file system refuses: the caller writes)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.link")
        try:
            os.link(self.held, tmp)
            os.replace(tmp, dest)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False
        return True


def take_params(path: str | os.PathLike[str]) -> TakenFile:
    """Take a task's model file from the site (see the module docstring): its tensors, views of the file."""
    src = Path(path)
    held = src.parent / f"{HELD_PREFIX}{secrets.token_hex(8)}"
    try:
        os.rename(src, held)  # atomic: the file is ours, or the site already took it back (task timed out)
    except FileNotFoundError as exc:
        raise JobError(f"model file {path} is missing") from exc
    except OSError as exc:
        raise JobError(f"cannot take model file {path}: {exc}") from exc
    try:
        params, mem = serde.map_file(held)
    except (FedbusError, OSError, ValueError) as exc:
        with contextlib.suppress(OSError):
            os.unlink(held)
        raise JobError(f"cannot read model file {path}: {exc}") from exc
    weakref.finalize(mem, _give_back, held)
    return TakenFile(held, params)


def _give_back(held: Path) -> None:
    """The last view of a taken file is gone: recycle it for the site's next download, unless another link
    (a result still uploading or kept for resuming) may read it, in which case only this name goes."""
    with contextlib.suppress(OSError):
        st = os.lstat(held)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            FilePool(held.parent).give(held)
        else:
            os.unlink(held)
