"""Small jobs for the recipe tests: a tiny script (one tensor, no data), and hello-pt's recipe."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[2]

TINY = """
import sys, time
import fedbus.client as flare

mode = sys.argv[1] if len(sys.argv) > 1 else "ok"
flare.init()
info = flare.system_info()
while flare.is_running():
    model = flare.receive()
    if model is None:
        break
    if flare.is_evaluate():
        # params set on purpose: they must not leave the site for an evaluation
        metrics = {"score": float(model.params["w"].sum()), "num_samples": 10.0 * (info["site_index"] + 1)}
        metrics["speed"] = info.get("speed_factor", 1.0)
        flare.send(flare.FLModel(params=model.params, metrics=metrics))
        continue
    if mode == "crash":
        raise RuntimeError("boom at " + flare.get_site_name())
    if mode == "slow":
        time.sleep(0.2)
    params = {k: v + 1 for k, v in model.params.items()}
    flare.send(flare.FLModel(params=params, metrics={"loss": 1.0}, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""


def tiny_script(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.py"
    path.write_text(TINY)
    return path


def tiny_model() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(4)}


def load_example(name: str, rel: str) -> object:
    """An example's job.py as a module (examples are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def descendants(exclude: frozenset[int] | set[int] = frozenset()) -> set[int]:
    """PIDs of every process below this one (daemons and the scripts they started), leaving out the
    children in ``exclude`` and everything below them."""
    out: set[int] = set()
    for child in psutil.Process().children():
        if child.pid in exclude:
            continue
        out.add(child.pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            out.update(p.pid for p in child.children(recursive=True))
    return out


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.NoSuchProcess:
            pass
    return out


SEED = """
import argparse, os
import torch
from torch import nn
import fedbus.client as flare
from net import TinyNet

parser = argparse.ArgumentParser()
parser.add_argument("--batch_size", type=int, required=True)
parser.add_argument("--epochs", type=int, required=True)
parser.add_argument("--tag", default="")
args = parser.parse_args()

torch.manual_seed(0)
x = torch.randn(64, 3)
y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
net = TinyNet()
flare.init()
while flare.is_running():
    model = flare.receive()
    if model is None:
        break
    net.load_state_dict(model.params)
    with torch.no_grad():
        loss = float(nn.functional.mse_loss(net(x), y))
    info = {"loss": loss, "pid": float(os.getpid()), "batch_size": float(args.batch_size)}
    if flare.is_evaluate():
        flare.send(flare.FLModel(metrics=info))
        continue
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    steps = 0
    for _ in range(args.epochs):
        for i in range(0, len(x), args.batch_size):
            opt.zero_grad()
            nn.functional.mse_loss(net(x[i : i + args.batch_size]), y[i : i + args.batch_size]).backward()
            opt.step()
            steps += 1
    flare.send(flare.FLModel(params=net.state_dict(), metrics=info, meta={"NUM_STEPS_CURRENT_ROUND": steps}))
"""

NET = """
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, hidden: int = 0):
        super().__init__()
        self.fc = nn.Linear(3, 1) if not hidden else nn.Sequential(nn.Linear(3, hidden), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.fc(x)
"""


def seed_job(folder: Path) -> Path:
    """A FLARE-style job folder: ``client.py`` (argparse --batch_size --epochs) and ``net.py`` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "net.py").write_text(NET)
    script = folder / "client.py"
    script.write_text(SEED)
    return script
