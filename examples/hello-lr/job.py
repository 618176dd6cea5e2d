"""hello-lr: federated logistic regression by Newton-Raphson, the server solving with the sites' sums.

python prepare_data.py && python job.py
"""

import argparse

from fedbus.recipes import FedAvgLrRecipe, SimEnv

DATA_ROOT = "/tmp/fedbus/dataset/breast_cancer"


def define_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=5)
    parser.add_argument("--data_root", type=str, default=DATA_ROOT)
    parser.add_argument("--workspace", default=None)
    return parser.parse_args()


def main():
    args = define_parser()
    recipe = FedAvgLrRecipe(
        min_clients=args.n_clients,
        num_rounds=args.num_rounds,
        damping_factor=0.8,
        num_features=30,
        train_script="client.py",
        train_args=f"--data_root {args.data_root}",
    )
    env = SimEnv(num_clients=args.n_clients, num_threads=args.n_clients, workspace_root=args.workspace)
    run = recipe.execute(env)
    print("Job status:", run.get_status())
    print("Result location:", run.get_result())
    print("Metrics of the last global model:", run.history[-1]["metrics"])


if __name__ == "__main__":
    main()
