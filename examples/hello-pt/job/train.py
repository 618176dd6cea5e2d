"""hello-pt, local: train the CNN on one site's shard of the digits, no federation.

client.py beside this file is the same script federated; ``diff -w train.py client.py`` shows only the
client-API lines.
"""

from __future__ import annotations

import argparse

import torch
from net import Net, evaluate, load_partition
from torch import nn
from torch.utils.data import DataLoader


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
    torch.manual_seed(args.seed)
    site, site_index, num_sites = f"site-{args.site_index + 1}", args.site_index, args.num_sites
    train_loader, test_loader = load_partition(site_index, num_sites, seed=args.seed)
    model = Net()
    steps = train(model, train_loader, epochs=args.epochs, lr=args.lr)
    acc = evaluate(model, test_loader)
    print(f"{site}: accuracy {acc:.3f} on the local test split after {steps} steps")


if __name__ == "__main__":
    main()
