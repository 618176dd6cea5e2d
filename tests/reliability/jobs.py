"""Job folders for reliability tests: deterministic training, so that a run can be checked bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch

from fedbus.modelio import serde

# The update is a deterministic function of the received model, the round and the site, on a grid of
# 1/64 so that the weighted sum of a round is exact in float32 whatever order the updates arrive in:
# the final model then depends on what was aggregated, never on timing.
DETERMINISTIC = """
import sys, time
import torch
import fedbus.client as flare

pause = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
flare.init()
name = flare.get_site_name()
k = int(name.rsplit("-", 1)[-1])
while flare.is_running():
    model = flare.receive()
    r = model.current_round
    params = {}
    for key, w in model.params.items():
        x = torch.sin(w.double() * 0.37 + r) * 8 + k * 0.5 + r
        params[key] = (torch.round(x * 64) / 64).to(w.dtype)
    time.sleep(pause)
    flare.send(flare.FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": k}))
"""


def deterministic_job(folder: Path, *, sites: int, rounds: int, numel: int = 1000, pause: float = 0.0) -> Path:
    """A FedAvg job over ``sites`` sites (all of them every round) training deterministically."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "client.py").write_text(DETERMINISTIC)
    g = torch.Generator().manual_seed(11)
    model = {"w": torch.randn(numel, generator=g), "b": torch.randn(7, generator=g)}
    serde.write_file(folder / "model.safetensors", serde.layout(model))
    (folder / "job.toml").write_text(
        f'name = "det"\nmodel = "model.safetensors"\n\n[strategy]\nname = "fedavg"\nmin_clients = {sites}\n'
        f'num_rounds = {rounds}\n\n[script]\npath = "client.py"\nargs = ["{pause}"]\n\n'
        f"[sites]\nmin = {sites}\nmax = {sites}\n"
    )
    return folder
