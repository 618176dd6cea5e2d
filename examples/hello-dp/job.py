"""hello-dp: FedAvg of weight differences from sites that train with DP-SGD (Opacus).

python job.py --n_clients 2 --num_rounds 3 --target_epsilon 5
"""

import argparse

from model import TabularMLP

from fedbus.recipes import DataKind, FedAvgRecipe, SimEnv, add_experiment_tracking


def define_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--target_epsilon", type=float, default=5.0)
    parser.add_argument("--workspace", default=None)
    return parser.parse_args()


def main():
    args = define_parser()
    recipe = FedAvgRecipe(
        name="hello-dp",
        min_clients=args.n_clients,
        num_rounds=args.num_rounds,
        model=TabularMLP(input_dim=29, hidden_dims=[64, 32], output_dim=2),
        train_script="client.py",
        train_args=(
            f"--batch_size {args.batch_size} --epochs {args.epochs} --target_epsilon {args.target_epsilon} "
            f"--n_clients {args.n_clients} --num_rounds {args.num_rounds}"
        ),
        aggregator_data_kind=DataKind.WEIGHT_DIFF,
    )
    recipe.add_client_file("model.py")
    add_experiment_tracking(recipe, tracking_type="tensorboard")

    run = recipe.execute(SimEnv(num_clients=args.n_clients, workspace_root=args.workspace))
    print()
    print("Job Status is:", run.get_status())
    print("Result can be found in:", run.get_result())
    print("Last round:", run.history[-1]["metrics"])


if __name__ == "__main__":
    main()
