"""The training script every site runs, for FedAvg and for FedBuff alike (fedbus client API, FLARE style).

Each site trains the received global model for a few local epochs on its own Dirichlet part of the digits
and sends the FULL weights back; when the strategy wants deltas (FedBuff), the client API subtracts the
received model itself, so this script does not know which strategy it serves. In SimEnv all sites run
this ``main()`` in threads of one process: everything per site lives inside ``main()``.

``--step-ms`` makes each local step last at least that long in wall-clock time (the rest of it asleep). The MLP
trains a step in about 2 ms of CPU, but twenty simulated sites share two cores: without it the experiment
would measure the host's CPU queue, not the sites. With it, a task's duration is proportional to the
site's work, as on a real device, and the simulator's speed factors stretch that time per site.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from data import site_data
from model import MLP, evaluate
from torch import nn

import fedbus.client as flare


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    gen: torch.Generator,
    step_s: float = 0.0,
) -> tuple[int, float]:
    """Local SGD (momentum 0.9) in place; returns (optimizer steps, mean training loss of the last epoch).

    ``step_s`` > 0 paces training: step n ends no earlier than n x step_s after the start (see --step-ms).
    """
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    started = time.monotonic()
    steps, losses = 0, []
    for _ in range(epochs):
        losses = []
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            steps += 1
            if step_s > 0:
                time.sleep(max(0.0, started + steps * step_s - time.monotonic()))
    return steps, float(np.mean(losses)) if losses else 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration of the label skew")
    parser.add_argument("--seed", type=int, default=0, help="seed of the partition and of the local shuffles")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--step-ms",
        type=float,
        default=0.0,
        help="simulated device time per local step: a task lasts at least steps x this (0: real time only)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # many sites share a couple of cores
    flare.init()
    info = flare.system_info()
    site_index, num_sites = info["site_index"], info["num_sites"]
    x_np, y_np = site_data(site_index, num_sites, args.alpha, args.seed)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    gen = torch.Generator().manual_seed(args.seed * 100_003 + site_index)  # per site: threads share no RNG
    model = MLP()
    while flare.is_running():
        input_model = flare.receive()
        if input_model is None:
            break
        model.load_state_dict(input_model.params)
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"accuracy": evaluate(model, x_np, y_np)}))
            continue
        steps, loss = train(
            model, x, y, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, gen=gen, step_s=args.step_ms / 1000
        )
        meta = {"NUM_STEPS_CURRENT_ROUND": steps}
        flare.send(flare.FLModel(params=model.state_dict(), metrics={"train_loss": loss}, meta=meta))


if __name__ == "__main__":
    main()
