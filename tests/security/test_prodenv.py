"""The operator's path end to end: kits from ``fedbus provision``, daemons started by the CLI with
``--config KIT/...``, a recipe submitted through ``ProdEnv(kit=...)``; and a plaintext ProdEnv refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedbus.errors import TransportError
from fedbus.recipes import FedAvgRecipe, ProdEnv
from tests.e2e.procs import Daemon
from tests.recipes.helpers import tiny_model, tiny_script
from tests.security.helpers import make_kits

pytestmark = pytest.mark.timeout(120)


def test_prodenv_runs_a_recipe_with_an_admin_kit(tmp_path: Path) -> None:
    kits = make_kits(tmp_path)
    broker = Daemon(
        ["broker", "--config", str(kits / "broker" / "broker.toml"), "--bind", "tcp://127.0.0.1:0",
         "--workspace", str(tmp_path / "broker")],
        tmp_path / "broker.log",
    )  # fmt: skip
    sites: list[Daemon] = []
    try:
        address = broker.wait_for("broker listening")["address"]
        for name in ("site-1", "site-2"):
            args = ["site", "--config", str(kits / name / "site.toml"), "--broker", address]
            sites.append(Daemon([*args, "--workspace", str(tmp_path / name)], tmp_path / f"{name}.log"))
        recipe = FedAvgRecipe("tiny", tiny_model(), tiny_script(tmp_path / "code"), min_clients=2, num_rounds=1)

        with pytest.raises(TransportError, match="no answer"):  # without the kit: plaintext, refused
            env = ProdEnv(address, workspace=tmp_path / "plain", progress=False)
            env.poll_s = 0.2
            _short_timeout(env)
            recipe.execute(env)

        env = ProdEnv(address, kit=kits / "ops", workspace=tmp_path / "results", progress=False)
        env.poll_s = 0.2
        run = recipe.execute(env).wait(timeout=90)
        assert run.status == "finished", run.reason
        assert [h["version"] for h in run.history] == [0, 1]
        assert float(run.model["w"][0]) == pytest.approx(1.0)  # type: ignore[index]
    finally:
        for d in [*sites, broker]:
            d.stop()
    assert ProdEnv(kit=kits / "ops").broker == "tcp://127.0.0.1:7788"  # the kit's address by default


def _short_timeout(env: ProdEnv) -> None:
    """The plaintext attempt waits for a welcome that never comes: 2 s instead of the default 30 s."""
    env.admin_options = {"timeout": 2.0}
