"""hello-pt, federated: train.py beside this file with the fedbus client API (NVIDIA FLARE style).

``diff -w train.py client.py`` shows only the client-API lines. The site runs this script; site_index and
num_sites come from the job, so each site trains on its own shard.
"""

from __future__ import annotations

import argparse

import torch
from net import Net, evaluate, load_partition
from torch import nn
from torch.utils.data import DataLoader

import fedbus.client as flare


def train(model: nn.Module, loader: DataLoader, *, epochs: int, lr: float) -> int:
    """Train in place with Adam; returns the number of optimizer steps taken."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    steps = 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            steps += 1
    return steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--site-index", type=int, default=0)
    parser.add_argument("--num-sites", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    flare.init()
    torch.manual_seed(args.seed)
    info = flare.system_info()
    site, site_index, num_sites = flare.get_site_name(), info["site_index"], info["num_sites"]
    train_loader, test_loader = load_partition(site_index, num_sites, seed=args.seed)
    model = Net()
    last_params = None
    while flare.is_running():
        input_model = flare.receive()
        if flare.is_submit_model():  # cross-site evaluation asks for this site's own model
            flare.send(flare.FLModel(params=last_params or model.state_dict()))
            continue
        model.load_state_dict(input_model.params)
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"accuracy": evaluate(model, test_loader)}))
            continue
        steps = train(model, train_loader, epochs=args.epochs, lr=args.lr)
        acc = evaluate(model, test_loader)
        print(f"{site}: accuracy {acc:.3f} on the local test split after {steps} steps")
        meta = {"NUM_STEPS_CURRENT_ROUND": steps}
        last_params = {k: v.clone() for k, v in model.state_dict().items()}
        flare.send(flare.FLModel(params=model.cpu().state_dict(), metrics={"accuracy": acc}, meta=meta))


if __name__ == "__main__":
    main()
