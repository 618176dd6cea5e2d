"""Scripts and models for the simulated-time tests: tiny, seeded, both script forms."""

from __future__ import annotations

from pathlib import Path

import torch

FUNCTION_SCRIPT = """
import torch
import fedbus.client as flare

def run_task(site, model):
    if site.kind == "evaluate":
        return flare.FLModel(metrics={"norm": float(model.params["w"].norm())})
    g = site.generator
    w = model.params["w"]
    for _ in range(3):  # a few noisy steps toward the site's target
        target = torch.full_like(w, float(site.index % 5))
        w = w - 0.1 * (w - target) + 0.01 * torch.randn(w.shape, generator=g)
    site.state["tasks"] = site.state.get("tasks", 0) + 1
    return flare.FLModel(params={"w": w, "b": model.params["b"] + 1}, meta={"NUM_STEPS_CURRENT_ROUND": 3},
                         metrics={"tasks_here": float(site.state["tasks"])})
"""

FLARE_SCRIPT = """
import torch
import fedbus.client as flare

def main():
    flare.init()
    info = flare.system_info()
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        g = torch.Generator().manual_seed(model.meta["seed"])
        w = model.params["w"] + 0.01 * torch.randn(model.params["w"].shape, generator=g) + info["site_index"]
        flare.send(flare.FLModel(params={"w": w, "b": model.params["b"]}, meta={"NUM_STEPS_CURRENT_ROUND": 2}))

if __name__ == "__main__":
    main()
"""


def script(folder: Path, text: str = FUNCTION_SCRIPT, name: str = "train.py") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def model(n: int = 8) -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(n), "b": torch.zeros(2)}
