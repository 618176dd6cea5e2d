"""hello-dp's script: DP-SGD with Opacus at each site, the sites sending weight differences.

The data is a locally generated, imbalanced tabular problem (29 features, ~15% positives), split between
the sites. Opacus' ``make_private_with_epsilon`` picks the noise so that the site's whole training (all
rounds) stays within ``--target_epsilon``; the epsilon spent so far is printed and tracked each round.
"""

import argparse
import warnings

import torch
from model import TabularMLP
from opacus import PrivacyEngine
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fedbus.client as flare
from fedbus.client import ParamsType
from fedbus.client.tracking import SummaryWriter

warnings.filterwarnings("ignore", module="opacus")  # its notice about secure RNG
warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus' per-sample hooks, harmless


def load_site_data(site_index, n_clients, batch_size):
    x, y = make_classification(
        n_samples=3000,
        n_features=29,
        n_informative=12,
        weights=[0.85, 0.15],
        class_sep=2.0,
        flip_y=0.01,
        random_state=0,
    )
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    train_idx = range(site_index, len(y_train), n_clients)
    test_idx = range(site_index, len(y_test), n_clients)

    def tensors(xs, ys, idx):
        return TensorDataset(torch.tensor(xs[list(idx)], dtype=torch.float32), torch.tensor(ys[list(idx)]))

    train = DataLoader(tensors(x_train, y_train, train_idx), batch_size=batch_size, shuffle=True)
    test = DataLoader(tensors(x_test, y_test, test_idx), batch_size=256)
    return train, test


def evaluate(model, loader):
    model.eval()
    correct = total = true_pos = positives = 0
    with torch.no_grad():
        for x, y in loader:
            predicted = model(x).argmax(dim=1)
            correct += int((predicted == y).sum())
            total += len(y)
            true_pos += int(((predicted == 1) & (y == 1)).sum())
            positives += int((y == 1).sum())
    return {"accuracy": correct / total, "recall": true_pos / max(positives, 1)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--target_epsilon", type=float, default=5.0)
    parser.add_argument("--target_delta", type=float, default=1e-5)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=3)
    args = parser.parse_args()

    flare.init()
    info = flare.system_info()
    site_name = info["site_name"]
    train_loader, test_loader = load_site_data(info["site_index"], args.n_clients, args.batch_size)
    model = TabularMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    privacy_engine = PrivacyEngine()
    private_model, optimizer, train_loader = privacy_engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        epochs=args.epochs * args.num_rounds,
        target_epsilon=args.target_epsilon,
        target_delta=args.target_delta,
        max_grad_norm=args.max_grad_norm,
    )
    writer = SummaryWriter()
    loss_fn = nn.CrossEntropyLoss()

    while flare.is_running():
        input_model = flare.receive()
        model.load_state_dict(input_model.params)  # the plain module inside Opacus' wrapper
        global_weights = {k: v.clone() for k, v in model.state_dict().items()}

        private_model.train()
        steps = 0
        for _ in range(args.epochs):
            for x, y in train_loader:
                if len(y) == 0:  # Poisson sampling can draw an empty batch
                    continue
                optimizer.zero_grad()
                loss_fn(private_model(x), y).backward()
                optimizer.step()
                steps += 1

        metrics = evaluate(model, test_loader)
        metrics["epsilon"] = float(privacy_engine.get_epsilon(args.target_delta))
        round_ = input_model.current_round
        print(f"{site_name}: round {round_}: {metrics}")
        for key, value in metrics.items():
            writer.add_scalar(tag=key, scalar=value, global_step=round_)

        diff = {k: v - global_weights[k] for k, v in model.state_dict().items()}
        flare.send(
            flare.FLModel(
                params=diff,
                params_type=ParamsType.DIFF,
                metrics=metrics,
                meta={"NUM_STEPS_CURRENT_ROUND": max(steps, 1)},
            )
        )


if __name__ == "__main__":
    main()
