"""hello-numpy-cross-val: cross-site evaluation, evaluation-only or after FedAvg training.

python generate_pretrain_models.py && python job.py --mode pretrained   # score two server models
python job.py --mode training                                           # FedAvg, then every site x model
"""

import argparse
import json
import os

from fedbus.recipes import NumpyCrossSiteEvalRecipe, NumpyFedAvgRecipe, SimEnv, add_cross_site_evaluation

SERVER_MODEL_DIR = "/tmp/fedbus/server_pretrain_models"


def define_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--mode", choices=["pretrained", "training"], default="pretrained")
    parser.add_argument("--num_rounds", type=int, default=1)
    parser.add_argument("--model_dir", default=SERVER_MODEL_DIR)
    parser.add_argument("--workspace", default=None)
    return parser.parse_args()


def show(run):
    results = os.path.join(run.get_result(), "cross_site_val", "cross_val_results.json")
    print("Job status:", run.get_status())
    print("Cross-site results:", results)
    with open(results) as f:
        for model, by_site in sorted(json.load(f).items()):
            print(f"  {model}: " + ", ".join(f"{s} {m}" for s, m in sorted(by_site.items())))


def main():
    args = define_parser()
    env = SimEnv(num_clients=args.n_clients, workspace_root=args.workspace)
    if args.mode == "pretrained":
        recipe = NumpyCrossSiteEvalRecipe(
            name="hello-numpy-cse",
            min_clients=args.n_clients,
            eval_script="client.py",
            model_dir=args.model_dir,
            model_name={"server_model_1": "server_1.npy", "server_model_2": "server_2.npy"},
        )
    else:
        recipe = NumpyFedAvgRecipe(
            name="hello-numpy-train-cse",
            min_clients=args.n_clients,
            num_rounds=args.num_rounds,
            model=[0.0] * 10,
            train_script="client.py",
            train_args="",
        )
        add_cross_site_evaluation(recipe)
    show(recipe.execute(env))


if __name__ == "__main__":
    main()
