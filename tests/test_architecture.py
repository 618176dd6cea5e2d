"""The layering and types of fedbus, checked mechanically: the import-linter contracts of pyproject.toml must
hold, and ``mypy fedbus`` must find no error.

``lint-imports`` reads ``[tool.importlinter]`` and fails when a module imports what its layer may not (zmq
outside transport, torch or numpy in transport, IO in protocol or strategy, broker code in the client).
``mypy`` reads ``[tool.mypy]``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _lint_imports() -> list[str]:
    """The ``lint-imports`` command, or import-linter's entry point run by this Python."""
    exe = shutil.which("lint-imports")
    if exe is not None:
        return [exe]
    pytest.importorskip("importlinter", reason="import-linter is not installed (pip install -e '.[dev]')")
    entry = "import sys; from importlinter.cli import lint_imports_command as main; sys.exit(main())"
    return [sys.executable, "-c", entry]


def test_the_import_contracts_hold() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's fedbus, not an installed one
    out = subprocess.run(
        [*_lint_imports(), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"lint-imports: a layering contract is broken\n{out.stdout}\n{out.stderr}"


# A first run analyses torch, numpy, mlflow and wandb as well as fedbus: about a minute on two busy cores,
# more on a slow runner. Later runs read .mypy_cache (gitignored) and take seconds.
MYPY_TIMEOUT_S = 540


@pytest.mark.timeout(MYPY_TIMEOUT_S + 60)
def test_the_package_type_checks() -> None:
    """Every mypy error fails the suite: ``# type: ignore`` carries its error code (and a reason), and unused
    ones are errors too (``warn_unused_ignores``)."""
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "fedbus"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=MYPY_TIMEOUT_S,
    )
    assert out.returncode == 0, f"mypy fedbus: the package does not type-check\n{out.stdout}\n{out.stderr}"


def test_the_zmq_contract_names_every_top_level_module_but_transport() -> None:
    """A new top-level module or package is held to "only transport imports zmq" too."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["name"] == "only transport imports zmq"]
    tops = {
        f"fedbus.{p.stem if p.is_file() else p.name}"
        for p in (ROOT / "fedbus").iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()
    }
    assert set(contract["source_modules"]) == tops - {"fedbus.transport"}


def test_the_context_type_comes_from_transport_which_loads_zmq_only_when_asked() -> None:
    code = (
        "import sys, fedbus.transport as t; assert 'zmq' not in sys.modules, 'zmq loaded by import fedbus.transport'; "
        "from fedbus.transport.endpoint import daemon_context; ctx = daemon_context(); "
        "assert isinstance(ctx, t.Context); ctx.term(); print('ok')"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
