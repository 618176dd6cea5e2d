"""The initial model of a recipe, from every form a FLARE ``job.py`` gives it, as a private CPU state_dict.

Forms (``model``): an ``nn.Module``; a state_dict; a ``.safetensors`` / ``.pt`` / ``.pth`` checkpoint path;
FLARE's ``{"class_path": "model.SimpleNetwork", "args": {...}}`` (``"path"`` is taken as well), imported
with the training script's folder first on ``sys.path`` (where the script finds it too), instantiated with
``args``, and its state_dict taken. ``initial_ckpt`` is a checkpoint whose tensors replace the model's
(names and shapes must match the model's; without a model the checkpoint alone is the model). ``.pt``
files are read with ``torch.load(weights_only=True)``: a checkpoint is data, never code to run.

Numpy recipes give arrays (a nested list, an ndarray, or a dict of them) or a ``.npy`` file: one array
travels as FLARE's ``numpy_key`` tensor in float32 (what FLARE's numpy persistor holds); the script
receives numpy arrays again (the job's ``[client] exchange = "numpy"``).

Every failure is a ConfigError naming the argument (``model``, ``initial_ckpt``, ``eval_ckpt``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedbus.client.constants import NPConstants
from fedbus.errors import ConfigError, FedbusError
from fedbus.modelio import serde

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")
CHECKPOINT_KEYS = ("model", "state_dict")
"""Keys under which a torch checkpoint may hold the state_dict (``torch.save({"model": sd, ...})``)."""


def is_class_config(model: object) -> bool:
    """Whether ``model`` is FLARE's dict config rather than a state_dict."""
    return isinstance(model, Mapping) and isinstance(model.get("class_path", model.get("path")), str)


def tensors(state: Mapping[Any, Any], what: str) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of a state_dict's tensors, or ConfigError naming ``what``."""
    if not state:
        raise ConfigError(f"{what}: the state_dict is empty")
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise ConfigError(f"{what}: entry {name!r} must map a name to a tensor")
        out[name] = t.detach().to("cpu", copy=True).contiguous()
    return out


def read_checkpoint(path: str | os.PathLike[str], what: str) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` / ``.pt`` / ``.pth`` file's state_dict."""
    p = Path(path)
    if p.suffix not in CHECKPOINT_SUFFIXES or not p.is_file():
        raise ConfigError(f"{what}: {p} is not a {' / '.join(CHECKPOINT_SUFFIXES)} file")
    try:
        if p.suffix == ".safetensors":
            state: Any = serde.read_file(p)
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except (FedbusError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{what}: cannot read {p}: {reason}") from exc
    if isinstance(state, Mapping):
        for key in CHECKPOINT_KEYS:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping):
        raise ConfigError(f"{what}: {p} holds a {type(state).__name__}, not a state_dict")
    return tensors(state, what)


@contextlib.contextmanager
def script_imports(folder: Path) -> Iterator[None]:
    """``folder`` first on ``sys.path`` for the duration; modules loaded from it are forgotten afterwards,
    so a later import of the same name (another job's folder) is not served a stale module."""
    before = set(sys.modules)
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(folder))
        prefix = os.path.join(os.path.abspath(folder), "")
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None)
            if isinstance(file, str) and os.path.abspath(file).startswith(prefix):
                del sys.modules[name]


def instantiate(config: Mapping[str, Any], folder: Path) -> nn.Module:
    """FLARE's ``{"class_path": "module.Class", "args": {...}}``, built with ``folder`` importable."""
    unknown = set(config) - {"class_path", "path", "args"}
    if unknown:
        raise ConfigError(f"model: unknown key(s) {sorted(unknown)} in the class config (class_path, args)")
    class_path = str(config.get("class_path", config.get("path")))
    args = config.get("args") or {}
    if not isinstance(args, Mapping):
        raise ConfigError(f"model: args of {class_path!r} must be a dict, got {type(args).__name__}")
    module_name, _, attr = class_path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"model: class_path must be 'module.ClassName', got {class_path!r}")
    with script_imports(folder):
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"model: cannot import {class_path!r} (next to {folder}): {exc}") from exc
        try:
            model = cls(**args)
        except Exception as exc:  # the user's constructor: any error is the config's fault
            raise ConfigError(f"model: {class_path}(**{dict(args)!r}) failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: {class_path} made a {type(model).__name__}, not an nn.Module")
    return model


def torch_model(
    model: Any, initial_ckpt: str | os.PathLike[str] | None, folder: Path, *, ckpt_arg: str = "initial_ckpt"
) -> tuple[dict[str, torch.Tensor], Path | None]:
    """The initial state_dict from ``model`` (any form above) and ``initial_ckpt``, and the source file of
    the model's class when it lies in the script's folder (see :func:`local_source`)."""
    source: Path | None = None
    state: dict[str, torch.Tensor] | None = None
    if isinstance(model, nn.Module):
        source, state = local_source(type(model).__module__, folder), tensors(model.state_dict(), "model")
    elif is_class_config(model):
        state = tensors(instantiate(model, folder).state_dict(), "model")
        source = local_source(str(model.get("class_path", model.get("path"))).rpartition(".")[0], folder)
    elif isinstance(model, Mapping):
        state = tensors(model, "model")
    elif isinstance(model, str | os.PathLike):
        state = read_checkpoint(model, "model")
    elif model is not None:
        raise ConfigError(
            "model must be an nn.Module, a state_dict, a .safetensors/.pt path or "
            f'{{"class_path": ..., "args": ...}}, not {type(model).__name__}'
        )
    if initial_ckpt is not None:
        if not isinstance(initial_ckpt, str | os.PathLike):
            raise ConfigError(f"{ckpt_arg} must be a checkpoint path, got {type(initial_ckpt).__name__}")
        ckpt = read_checkpoint(initial_ckpt, ckpt_arg)
        state = ckpt if state is None else overlay(state, ckpt, ckpt_arg)
    if state is None:
        raise ConfigError(f"model: give a model or an {ckpt_arg} (the job needs an initial model)")
    return state, source


def overlay(state: Mapping[str, torch.Tensor], ckpt: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """The model's state with every tensor taken from the checkpoint (same names and shapes, model's dtype)."""
    missing, extra = sorted(set(state) - set(ckpt)), sorted(set(ckpt) - set(state))
    if missing or extra:
        raise ConfigError(f"{what}: does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    out = {}
    for name, t in state.items():
        c = ckpt[name]
        if c.shape != t.shape:
            raise ConfigError(f"{what}: {name} has shape {tuple(c.shape)}, the model {tuple(t.shape)}")
        out[name] = c.to(t.dtype).contiguous()
    return out


def numpy_model(model: Any, initial_ckpt: str | os.PathLike[str] | None) -> dict[str, torch.Tensor]:
    """A numpy recipe's initial model: one array under ``numpy_key`` (or a dict of arrays), as float32
    tensors; ``initial_ckpt`` is a ``.npy`` file that replaces it."""
    if initial_ckpt is not None:
        path = Path(initial_ckpt)
        if path.suffix != ".npy" or not path.is_file():
            raise ConfigError(f"initial_ckpt: {path} is not a .npy file")
        try:
            model = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"initial_ckpt: cannot read {path}: {exc}") from exc
    if model is None:
        raise ConfigError("model: give an array (or initial_ckpt, a .npy file): the job needs an initial model")
    arrays = dict(model) if isinstance(model, Mapping) else {NPConstants.NUMPY_KEY: model}
    out = {}
    for name, value in arrays.items():
        if not isinstance(name, str):
            raise ConfigError(f"model: array names must be strings, got {name!r}")
        try:
            array = np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model: {name!r} is not a numeric array: {exc}") from exc
        out[name] = torch.from_numpy(np.ascontiguousarray(array)).clone()
    if not out:
        raise ConfigError("model: no arrays given")
    return out


def local_source(module_name: str, folder: Path) -> Path | None:
    """The file (or package folder) of module ``module_name`` when it lies in ``folder``, the training
    script's folder: the script imports it from there (``from model import Net``), so it ships with the job
    as FLARE ships a model's module. Classes from installed packages or from ``__main__`` need nothing."""
    top = module_name.split(".")[0]
    if not top or top == "__main__":
        return None
    for candidate in (folder / f"{top}.py", folder / top):
        if candidate.is_file() or (candidate / "__init__.py").is_file():
            return candidate.resolve()
    return None
