"""Model files on the local link: the site and the script hand each other ``.safetensors`` paths.

Why files and not frames: a model handed over through the page cache costs one write and no socket
copies, the training script's memory is never doubled by a serialized copy sitting in a socket buffer,
and the file the site streams to the broker is byte for byte the file the script wrote. ``fedbus.serde``
does the work: it validates the header of what it reads, and writes tensor by tensor (no concatenated
copy) into a temporary file that is renamed into place, so the site never sees half a model (no fsync:
the file lives for seconds, and a crash of the machine loses the task anyway). The temporary file is one the
site released after an earlier upload, when there is one (``fedbus.recycle``: 5-9x less CPU to write).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from fedbus import serde
from fedbus.errors import FedbusError, JobError
from fedbus.recycle import FilePool


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
