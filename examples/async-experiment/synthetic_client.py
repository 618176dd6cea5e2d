"""The large experiment's training code, in the simulator's function form: ``run_task(site, model)``.

A site is a record in the simulation, not a process: this module is imported once per worker, and
``run_task`` trains whichever site a task is for, on that site's Synthetic(alpha, beta) data
(``synthetic.device``, generated on demand and cached), with local SGD on a softmax regression. The task's
``site.generator`` (seeded from the run's seed, the site and the task) orders the mini-batches, so a run is
reproducible whichever worker trains which task. The same job runs on real sites through the client API:
``main()`` below is the FLARE-style loop around the same ``local_sgd``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from synthetic import device
from torch import nn

import fedbus.client as flare


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=10)
    return parser.parse_known_args(argv)[0]


def local_sgd(
    params: dict[str, torch.Tensor], x: np.ndarray, y: np.ndarray, args: argparse.Namespace, gen: torch.Generator
) -> tuple[dict[str, torch.Tensor], int, float]:
    """Softmax regression trained from ``params``; returns (params, steps, mean loss of the last epoch)."""
    w = params["linear.weight"].clone().requires_grad_(True)
    b = params["linear.bias"].clone().requires_grad_(True)
    xt, yt = torch.from_numpy(x).to(w.device), torch.from_numpy(y).to(w.device)  # a GPU worker's device
    steps, losses = 0, []
    for _ in range(args.epochs):
        losses = []
        for idx in torch.randperm(len(yt), generator=gen).to(w.device).split(args.batch_size):
            loss = nn.functional.cross_entropy(xt[idx] @ w.T + b, yt[idx])
            gw, gb = torch.autograd.grad(loss, (w, b))
            with torch.no_grad():
                w -= args.lr * gw
                b -= args.lr * gb
            losses.append(loss.detach())  # no device sync per step
            steps += 1
    mean_loss = float(torch.stack(losses).mean()) if losses else 0.0
    return {"linear.weight": w.detach(), "linear.bias": b.detach()}, steps, mean_loss


def run_task(site, model: flare.FLModel) -> flare.FLModel:
    args = parse_args()
    x, y, _, _ = device(site.index, args.alpha, args.beta, args.seed)
    params, steps, loss = local_sgd(dict(model.params), x, y, args, site.generator)
    return flare.FLModel(params=params, metrics={"train_loss": loss}, meta={"NUM_STEPS_CURRENT_ROUND": steps})


def main() -> None:
    args = parse_args()
    flare.init()
    info = flare.system_info()
    x, y, _, _ = device(info["site_index"], args.alpha, args.beta, args.seed)
    gen = torch.Generator().manual_seed(args.seed * 100_003 + info["site_index"])
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        params, steps, loss = local_sgd(dict(model.params), x, y, args, gen)
        flare.send(flare.FLModel(params=params, metrics={"train_loss": loss}, meta={"NUM_STEPS_CURRENT_ROUND": steps}))


if __name__ == "__main__":
    main()
