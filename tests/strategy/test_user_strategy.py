"""The aggregator extension point: make_strategy("package.module:ClassName") imports a user's Strategy subclass."""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedbus.errors import ConfigError
from fedbus.strategy import Dispatch, FedAvg, Publish, make_strategy, resolve_strategy_class

from .helpers import answer, of

SOURCE = '''
import torch
from fedbus.strategy import FedAvg


class HalfStep(FedAvg):
    """FedAvg that moves only half way to the mean."""

    def __init__(self, min_clients: int, num_rounds: int, share: float = 0.5) -> None:
        super().__init__(min_clients, num_rounds)
        self.share = share

    def _finish_aggregate(self):
        mean = super()._finish_aggregate()
        return {k: torch.lerp(self._global[k], v, self.share) for k, v in mean.items()}


class Box:
    class Inner(HalfStep):
        pass


class NotAStrategy:
    pass


class Abstract(__import__("fedbus.strategy").strategy.Strategy):
    pass
'''


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A job folder on sys.path holding a fresh package with user strategies; its name is unique per test."""
    name = f"userpkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / "strategies.py").write_text(textwrap.dedent(SOURCE))
    (tmp_path / name / "broken.py").write_text("import not_a_module_anywhere_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield name
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def test_a_user_subclass_is_built_and_runs(module: str) -> None:
    s = make_strategy(f"{module}.strategies:HalfStep", min_clients=1, num_rounds=1, share=0.25)
    assert isinstance(s, FedAvg) and type(s).__name__ == "HalfStep"
    (d,) = of(s.start({"w": torch.tensor([0.0, 4.0])}, ["a"], now=0.0), Dispatch)
    (pub,) = of(s.on_update(answer(d, {"w": torch.tensor([4.0, 8.0])}), 1.0), Publish)
    assert torch.equal(pub.model["w"], torch.tensor([1.0, 5.0]))  # a quarter of the way: 0 -> 4, 4 -> 8


def test_nested_class_names_resolve(module: str) -> None:
    assert resolve_strategy_class(f"{module}.strategies:Box.Inner").__name__ == "Inner"


@pytest.mark.parametrize(
    ("suffix", "needle"),
    [
        (".nowhere:X", "cannot import module"),
        (".broken:X", "cannot import module"),
        (".strategies:Missing", "has no 'Missing'"),
        (".strategies:NotAStrategy", "is not a subclass of fedbus.strategy.Strategy"),
        (".strategies:Abstract", "does not implement"),
        (".strategies:", "a user strategy is named 'package.module:ClassName'"),
    ],
)
def test_bad_paths_are_config_errors_naming_the_path(module: str, suffix: str, needle: str) -> None:
    path = module + suffix
    with pytest.raises(ConfigError) as err:
        make_strategy(path, min_clients=1, num_rounds=1)
    assert f"strategy {path!r}" in str(err.value) and needle in str(err.value)


def test_user_strategy_arguments_are_checked_like_registered_ones(module: str) -> None:
    with pytest.raises(ConfigError, match="has no argument 'shar' \\(did you mean 'share'\\?\\)"):
        make_strategy(f"{module}.strategies:HalfStep", min_clients=1, num_rounds=1, shar=0.3)
    with pytest.raises(ConfigError, match="needs argument\\(s\\): num_rounds"):
        make_strategy(f"{module}.strategies:HalfStep", min_clients=1)


def test_registered_names_include_the_new_strategies() -> None:
    from fedbus.strategy import STRATEGIES

    assert {"fedavg", "fedbuff", "fedprox", "scaffold", "fedopt", "cyclic", "fedeval", "fedavg_lr"} <= set(STRATEGIES)
