"""hello-lightning-eval: every site scores a pre-trained checkpoint on its own data (no training).

python generate_pretrain_models.py && python job.py --checkpoint /tmp/fedbus/pretrain_models/lit_digits.pt
"""

import argparse
import os
import sys
from pathlib import Path

HELLO_LIGHTNING = Path(__file__).resolve().parent.parent / "hello-lightning"
sys.path.insert(0, str(HELLO_LIGHTNING))
from model import LitDigits  # noqa: E402  (hello-lightning's model, shipped to the sites below)

from fedbus.recipes import FedEvalRecipe, SimEnv  # noqa: E402


def define_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--checkpoint", default="/tmp/fedbus/pretrain_models/lit_digits.pt")
    parser.add_argument("--workspace", default=None)
    return parser.parse_args()


def main():
    args = define_parser()
    recipe = FedEvalRecipe(
        min_clients=args.n_clients,
        model=LitDigits(),
        eval_ckpt=os.path.abspath(args.checkpoint),
        eval_script="client.py",
        eval_args=f"--batch_size {args.batch_size}",
    )
    recipe.add_client_file(HELLO_LIGHTNING / "model.py")
    run = recipe.execute(
        env=SimEnv(num_clients=args.n_clients, num_threads=args.n_clients, workspace_root=args.workspace)
    )
    print("Job status:", run.get_status())
    for evaluation in run.evaluations:
        for site, metrics in sorted(evaluation.sites.items()):
            print(f"  {site}: val_acc {metrics.get('val_acc', float('nan')):.3f}")
        print(f"  mean val_acc {evaluation.mean.get('val_acc', float('nan')):.3f}")


if __name__ == "__main__":
    main()
