"""Secure aggregation on real daemons: a FedAvg job of four sites over the bus, one dropping out mid-round.

The global model must equal plaintext FedAvg of the sites that stayed (within the fixed-point precision), and
no frame the broker received may hold a site's plaintext update, or its unmasked encoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("cryptography", reason="secure aggregation needs the secagg extra (cryptography)")

from fedbus.modelio import serde
from fedbus.secagg import encoding
from tests.broker.harness import federation, wait_job

pytestmark = pytest.mark.timeout(90)

# Site i sends global + i * pattern with weight i; site-4 crashes on its first task, after the daemon already
# took part in the round's key exchange (it drops out mid-round).
SCRIPT = """
import sys
import torch
import fedbus.client as flare

flare.init()
i = int(flare.get_site_name().split("-")[1])
while flare.is_running():
    model = flare.receive()
    if i == 4:
        sys.exit(3)
    params = {
        "w": model.params["w"] + i * (torch.arange(64, dtype=torch.float32) * 0.01 + 0.123),
        "b": model.params["b"] + 0.5 * i,
        "count": model.params["count"] + i,
    }
    flare.send(flare.FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": i}))
"""


def update_of(site: int, g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the script at ``site`` sends from global ``g`` (float32, as it computes it)."""
    w = g["w"].astype(np.float32) + site * (np.arange(64, dtype=np.float32) * np.float32(0.01) + np.float32(0.123))
    return {"w": w.astype(np.float32), "b": (g["b"] + np.float32(0.5 * site)).astype(np.float32)}


def write_job(folder: Path) -> None:
    folder.mkdir()
    (folder / "client.py").write_text(SCRIPT)
    model = {"w": torch.zeros(64), "b": torch.zeros(3), "count": torch.tensor(7)}
    serde.write_file(folder / "model.safetensors", serde.layout(model))
    (folder / "job.toml").write_text(
        'name = "secagg"\nmodel = "model.safetensors"\n\n[strategy]\nname = "fedavg"\nmin_clients = 3\n'
        "num_rounds = 2\nround_timeout = 30\n"
        "secure_aggregation = {threshold = 3, clip = 8.0, max_weight = 10}\n\n"
        '[script]\npath = "client.py"\n\n[sites]\nmin = 4\nmax = 4\n'
    )


async def test_fedavg_with_secure_aggregation_over_the_bus(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    write_job(folder)
    received: list[bytes] = []
    async with federation(tmp_path, sites=4) as (broker, _sites, admin):
        router: Any = broker.router
        recv_frames = router._recv_frames

        def tap() -> Any:  # every frame the broker reads, as bytes
            frames = recv_frames()
            received.extend(f.bytes for f in frames)
            return frames

        router._recv_frames = tap
        job_id = await admin.submit(folder)
        job = await wait_job(admin, job_id)
        assert job["state"] == "finished", job["reason"]
        final = serde.read_file(broker.store.checkpoint_path(job_id, 2))
        updates = broker.store.updates(job_id)

    accepted = sorted({u["site"] for u in updates if u["accepted"]})
    assert accepted == ["site-1", "site-2", "site-3"]  # site-4 dropped out in round 1
    # plaintext FedAvg of the sites that stayed, weighted by their steps, in float64
    g = {"w": np.zeros(64, np.float32), "b": np.zeros(3, np.float32)}
    sent: list[dict[str, np.ndarray]] = []
    for _ in range(2):
        ups = {i: update_of(i, g) for i in (1, 2, 3)}
        sent += ups.values()
        g = {k: sum(i * ups[i][k].astype(np.float64) for i in ups) / 6.0 for k in g}
        g = {k: v.astype(np.float32) for k, v in g.items()}
    scale = encoding.scale_for(32, 8.0, 4)
    precision = 4 / scale + 1e-6  # half a step per input, and float32's rounding of values near 10
    assert np.max(np.abs(final["w"].numpy() - g["w"])) <= precision
    assert np.max(np.abs(final["b"].numpy() - g["b"])) <= precision
    assert int(final["count"]) == 7  # integer tensors stay at the sites: the global keeps its own

    # No frame the broker read holds a plaintext update (any 16 bytes of it) or its unmasked encoding.
    wire = b"".join(received)
    assert b"secagg_reveal" in wire and b"secagg_advert" in wire  # the tap saw the protocol
    for up in sent:
        for arr in up.values():
            raw = arr.tobytes()
            for off in range(0, len(raw) - 16, 16):
                assert raw[off : off + 16] not in wire
        ring = encoding.encode([up["b"], up["w"]], 0.1, bits=32, clip=8.0, scale=scale)
        assert ring[:8].tobytes() not in wire


SIM_SCRIPT = """
import fedbus.client as flare

flare.init()
i = flare.system_info()["site_index"] + 1
while flare.is_running():
    model = flare.receive()
    params = {k: v + 0.25 * i for k, v in model.params.items()}
    flare.send(flare.FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": i}))
"""


@pytest.mark.parametrize("secure", [False, True])
def test_the_recipe_option_gives_the_plaintext_fedavg_model_in_simenv(tmp_path: Path, secure: bool) -> None:
    from fedbus.recipes import FedAvgRecipe, SimEnv

    script = tmp_path / "src" / "client.py"
    script.parent.mkdir()
    script.write_text(SIM_SCRIPT)
    options = {"threshold": 2, "clip": 4.0, "max_weight": 3} if secure else None
    model = {"w": torch.zeros(5), "b": torch.ones(2)}
    recipe = FedAvgRecipe("sim", model, script, min_clients=3, num_rounds=2, secure_aggregation=options)
    run = recipe.execute(SimEnv(3, workspace=tmp_path / "ws", progress=False))
    assert run.status == "finished", run.reason
    assert run.model is not None
    # plaintext FedAvg: each round adds the weighted mean of 0.25 * i with weights i = 1, 2, 3: 0.25 * 14 / 6
    step = 0.25 * 14 / 6
    precision = 0.0 if not secure else 3 / encoding.scale_for(32, 4.0, 3) + 1e-6
    assert torch.allclose(run.model["w"], torch.full((5,), 2 * step), rtol=0, atol=precision + 1e-6)
    assert torch.allclose(run.model["b"], torch.full((2,), 1 + 2 * step), rtol=0, atol=precision + 1e-6)
    if secure:
        assert all(u["weight"] == 1.0 for u in run.updates if u["accepted"])  # the real weights travel masked
