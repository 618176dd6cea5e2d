"""The top-level package exposes exactly its version and the exception tree, and stays light."""

from __future__ import annotations

import subprocess
import sys

import fedbus


def test_public_surface_is_pinned() -> None:
    assert sorted(fedbus.__all__) == sorted(
        [
            "ConfigError",
            "FedbusError",
            "HeaderError",
            "JobError",
            "LocalProtocolError",
            "ProtocolError",
            "RemoteProtocolError",
            "StrategyError",
            "TransportError",
            "UpdateRejected",
            "__version__",
        ]
    )
    assert all(issubclass(getattr(fedbus, n), fedbus.FedbusError) for n in fedbus.__all__ if n != "__version__")


def test_importing_fedbus_loads_no_torch_zmq_or_daemons() -> None:
    heavy = ("torch", "zmq", "fedbus.broker", "fedbus.strategy")
    code = f"import sys, fedbus; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
