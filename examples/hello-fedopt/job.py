"""hello-fedopt: FedAvg's mean update applied by a server optimizer (FedOpt: SGD with momentum, Adam, Yogi, Adagrad).

python job.py --optimizer adam --server_lr 0.01
"""

import argparse
import sys
from pathlib import Path

HELLO_PT = Path(__file__).resolve().parent.parent / "hello-pt" / "job"
sys.path.insert(0, str(HELLO_PT))
from net import Net  # noqa: E402  (hello-pt's model; its client.py trains it)

from fedbus.recipes import FedOptRecipe, SimEnv  # noqa: E402


def define_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=3)
    parser.add_argument("--optimizer", choices=["sgd", "adam", "yogi", "adagrad"], default="sgd")
    parser.add_argument("--server_lr", type=float, default=1.0)
    parser.add_argument("--server_momentum", type=float, default=0.6)
    parser.add_argument("--workspace", default=None)
    return parser.parse_args()


def main():
    args = define_parser()
    recipe = FedOptRecipe(
        name="hello-fedopt",
        min_clients=args.n_clients,
        num_rounds=args.num_rounds,
        model=Net(),
        train_script=str(HELLO_PT / "client.py"),
        train_args="--epochs 1",
        server_optimizer=args.optimizer,
        server_lr=args.server_lr,
        server_momentum=args.server_momentum if args.optimizer == "sgd" else 0.0,
    )
    recipe.add_client_file(HELLO_PT / "net.py")
    run = recipe.execute(SimEnv(num_clients=args.n_clients, workspace_root=args.workspace))
    print("Job status:", run.get_status())
    for entry in run.history[1:]:
        print(f"  version {entry['version']}: accuracy {entry['metrics'].get('accuracy', float('nan')):.3f}")


if __name__ == "__main__":
    main()
