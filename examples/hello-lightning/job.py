"""hello-lightning as a recipe: FedAvg, FedProx or SCAFFOLD over the digits with a LightningModule.

python examples/hello-lightning/job.py --env sim                        # all sites in this process
python examples/hello-lightning/job.py --algorithm fedprox              # FedProx (mu = --fedprox_mu)
python examples/hello-lightning/job.py --algorithm scaffold             # SCAFFOLD's control variates
python examples/hello-lightning/job.py --env poc                        # a broker and site daemons as processes
python examples/hello-lightning/job.py --export /tmp/job                # the job folder, for `fedbus submit`

client.py is the same for all three: ``flare.patch(trainer)`` adds FedProx's proximal term or SCAFFOLD's
gradient correction when the job asks for it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from model import LitDigits  # noqa: E402  (the example's own module, also shipped to the sites)

from fedbus.recipes import FedAvgRecipe, FedProxRecipe, PocEnv, Recipe, ScaffoldRecipe, SimEnv  # noqa: E402


def make_recipe(
    sites: int = 2, rounds: int = 2, epochs: int = 1, algorithm: str = "fedavg", mu: float = 0.01
) -> Recipe:
    """``rounds`` rounds over ``sites`` sites with ``algorithm``, every site evaluating the final model."""
    torch.manual_seed(0)
    common = {
        "min_clients": sites,
        "num_rounds": rounds,
        "model": LitDigits(),
        "train_script": HERE / "client.py",
        "train_args": f"--epochs {epochs}",
        "evaluate_every": rounds,
    }
    if algorithm == "fedprox":
        recipe: Recipe = FedProxRecipe(name="hello-lightning-fedprox", fedprox_mu=mu, **common)
    elif algorithm == "scaffold":
        recipe = ScaffoldRecipe(name="hello-lightning-scaffold", **common)
    else:
        recipe = FedAvgRecipe(name="hello-lightning", **common)
    recipe.add_client_file(HERE / "model.py")
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", choices=("sim", "poc"), default="sim")
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--algorithm", choices=("fedavg", "fedprox", "scaffold"), default="fedavg")
    parser.add_argument("--fedprox_mu", type=float, default=0.01)
    parser.add_argument("--workspace", default=None, help="keep the run's files here (default: a temp folder)")
    parser.add_argument("--export", metavar="FOLDER", help="only write the job folder")
    args = parser.parse_args()
    recipe = make_recipe(args.sites, args.rounds, args.epochs, args.algorithm, args.fedprox_mu)
    if args.export:
        print(recipe.export(args.export))
        return
    env = SimEnv(args.sites, workspace=args.workspace) if args.env == "sim" else PocEnv(args.sites, args.workspace)
    run = recipe.execute(env)
    print(run.summary())
    final = run.evaluations[-1] if run.evaluations else None
    if final is not None:
        for site, m in sorted(final.sites.items()):
            print(f"  {site}: val_acc {m.get('val_acc', float('nan')):.3f} on {m.get('num_samples', 0):.0f} digits")
        print(f"  weighted mean val_acc {final.mean.get('val_acc', float('nan')):.3f}")
    sys.exit(0 if run.status == "finished" else 1)


if __name__ == "__main__":
    main()
