"""hello-numpy: FedAvg over numpy arrays, written as a FLARE job (only the imports differ).

python job.py                          # 2 sites, 3 rounds, FULL weights
python job.py --update_type diff       # the sites send differences
python job.py --enable_log_streaming   # every print() of the sites lands in the broker's job folder
python job.py --env poc                # a real broker and site daemons as local processes
"""

import argparse

from fedbus.recipes import NumpyFedAvgRecipe, PocEnv, SimEnv, TransferType, add_experiment_tracking


def define_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=3)
    parser.add_argument("--update_type", type=str, default="full", choices=["full", "diff"])
    parser.add_argument("--launch_process", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--enable_log_streaming", action="store_true")
    parser.add_argument("--env", choices=["sim", "poc"], default="sim")
    parser.add_argument("--workspace", default=None)
    return parser.parse_args()


def main():
    args = define_parser()
    recipe = NumpyFedAvgRecipe(
        name="hello-numpy",
        min_clients=args.n_clients,
        num_rounds=args.num_rounds,
        model=[[1, 2, 3], [4, 5, 6], [7, 8, 9]],
        train_script="client.py",
        train_args=f"--update_type {args.update_type}",
        launch_external_process=args.launch_process,
        params_transfer_type=TransferType.FULL if args.update_type == "full" else TransferType.DIFF,
    )
    add_experiment_tracking(recipe, tracking_type="tensorboard")
    if args.enable_log_streaming:
        recipe.enable_log_streaming()

    if args.env == "sim":
        env = SimEnv(num_clients=args.n_clients, workspace_root=args.workspace)
    else:
        env = PocEnv(num_clients=args.n_clients, workspace=args.workspace)
    run = recipe.execute(env)
    print()
    print("Job Status is:", run.get_status())
    print("Result can be found in :", run.get_result())
    print("Final model:", run.model["numpy_key"].tolist() if run.model else None)
    print()


if __name__ == "__main__":
    main()
