"""hello-pt as a recipe: the job in job/ built in Python, run in simulation or on local processes.

    python examples/hello-pt/job.py --env sim                    # broker, 3 sites, scripts: one process
    python examples/hello-pt/job.py --env poc                    # real daemons as local processes
    python examples/hello-pt/job.py --env sim --report-overhead  # wall time vs time inside training
    python examples/hello-pt/job.py --export /tmp/hello-pt-job   # the job folder, for `fedbus submit`
    python examples/hello-pt/job.py --cross_site_eval            # then every site scores every site's model
    python examples/hello-pt/job.py --enable_log_streaming       # sites' output in the job's logs/ at the broker
    python examples/hello-pt/job.py --launch_external_process    # each script in its own process

The final global model is scored on the held-out 20% of the digits that no site trains on, and every
site scores it on its own test shard (a federated evaluation: only metrics leave the sites).

Overhead = wall time of ``recipe.execute(env)`` minus the time during which at least one site was inside
its training loop (from ``receive()`` to ``send()``, as the sites measured it): what the environment
costs on top of the training itself (starting daemons and scripts, moving models, waiting at barriers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

JOB = Path(__file__).resolve().parent / "job"
sys.path.insert(0, str(JOB))

from net import Net, evaluate, heldout_loader  # noqa: E402  (the job's own module, also shipped to the sites)

from fedbus.recipes import FedAvgRecipe, PocEnv, Run, SimEnv, add_cross_site_evaluation, add_experiment_tracking  # noqa: E402


def make_recipe(
    sites: int = 3,
    rounds: int = 3,
    epochs: int = 1,
    evaluate: bool = True,
    *,
    launch_external_process: bool = False,
    client_memory_gc_rounds: int = 0,
) -> FedAvgRecipe:
    """The recipe equivalent of job/job.toml (plus a final federated evaluation)."""
    torch.manual_seed(0)
    recipe = FedAvgRecipe(
        name="hello-pt",
        model=Net(),
        train_script=JOB / "client.py",
        train_args=f"--epochs {epochs}",
        min_clients=sites,
        num_rounds=rounds,
        evaluate_every=rounds if evaluate else 0,
        launch_external_process=launch_external_process,
        client_memory_gc_rounds=client_memory_gc_rounds,
    )
    recipe.add_client_file(JOB / "net.py")
    add_experiment_tracking(recipe, tracking_type="tensorboard")
    return recipe


def heldout_accuracy(run: Run) -> float:
    """Accuracy of the run's final global model on the held-out digits."""
    net = Net()
    assert run.model is not None, f"run {run.job_id} has no model ({run.status}: {run.reason})"
    net.load_state_dict(run.model)
    return evaluate(net, heldout_loader())


def report(run: Run, env_name: str) -> str:
    """The overhead figures of one run, as printed by --report-overhead."""
    t = run.timing
    return (
        f"{env_name}: wall {t['wall_s']:.2f} s, inside training loops {t.get('busy_s', 0.0):.2f} s "
        f"(summed over sites {t.get('train_s', 0.0):.2f} s), overhead {t.get('overhead_s', float('nan')):.2f} s "
        f"(startup {t.get('startup_s', 0.0):.2f} s, teardown {t['wall_s'] - t.get('results_s', t['wall_s']):.2f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", choices=("sim", "poc"), default="sim")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--workspace", default=None, help="keep the run's files here (default: a temp folder)")
    parser.add_argument("--report-overhead", action="store_true", help="print wall time vs training time")
    parser.add_argument("--export", metavar="FOLDER", help="only write the job folder")
    parser.add_argument("--cross_site_eval", action="store_true", help="every site scores every site's model")
    parser.add_argument("--enable_log_streaming", action="store_true", help="sites' output reaches the broker")
    parser.add_argument("--launch_external_process", action="store_true", help="scripts in their own processes")
    parser.add_argument("--client_memory_gc_rounds", type=int, default=0, help="collect garbage every N rounds")
    args = parser.parse_args()
    recipe = make_recipe(
        args.sites,
        args.rounds,
        args.epochs,
        evaluate=not args.report_overhead,
        launch_external_process=args.launch_external_process,
        client_memory_gc_rounds=args.client_memory_gc_rounds,
    )
    if args.cross_site_eval:
        add_cross_site_evaluation(recipe)
    if args.enable_log_streaming:
        recipe.enable_log_streaming()
    if args.export:
        print(recipe.export(args.export))
        return
    if args.env == "sim":
        env: SimEnv | PocEnv = SimEnv(args.sites, workspace=args.workspace)
    else:
        env = PocEnv(args.sites, workspace=args.workspace)
    run = recipe.execute(env)
    print(run.summary())
    if run.status != "finished":
        sys.exit(f"the job did not finish: {run.reason}")
    print(f"final accuracy {heldout_accuracy(run):.3f} on the held-out digits (version {run.version})")
    if run.evaluations:
        final = run.evaluations[-1]
        per_site = ", ".join(f"{s} {m['accuracy']:.3f}" for s, m in sorted(final.sites.items()))
        print(f"federated evaluation of version {final.version}: {per_site}; mean {final.mean['accuracy']:.3f}")
    if run.cross_site:
        print("cross-site evaluation (accuracy of each model on each site's test split):")
        for model_name, by_site in sorted(run.cross_site.items()):
            scores = ", ".join(f"{site} {m.get('accuracy', float('nan')):.3f}" for site, m in sorted(by_site.items()))
            print(f"  {model_name}: {scores}")
    print("Job status:", run.get_status(), "- results in", run.get_result())
    if args.report_overhead:
        print(report(run, args.env))


if __name__ == "__main__":
    main()
