"""FedAvg against FedBuff on one non-IID federation with heavy-tailed site delays, on one wall-clock budget.

    python examples/async-experiment/run.py --quick          # about 70 s on 2 cores
    python examples/async-experiment/run.py                  # the full run, about 3 minutes
    python examples/async-experiment/run.py --large          # 1,000 sites on simulated time (large.py)

Both strategies start from the same seeded MLP, run the same ``client.py`` over the same Dirichlet(alpha)
partition of the digits on ``--sites`` simulated sites, with the same lognormal per-site slowdowns
(``SimEnv`` + ``SpeedProfile.lognormal``) and the same time budget. Every global version the broker
checkpointed is then scored here on the held-out 20% no site ever sees. Output, under ``--out``:
``metrics.csv`` (one row per global version) and ``accuracy.png`` (held-out accuracy against wall-clock
and against client updates); on stdout a short table and, as the last line, one JSON object with the
seconds each strategy took to reach ``--target`` and their ratio (FedBuff / FedAvg).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # data.py and model.py beside this file: the driver scores with them too

import data  # noqa: E402
import structlog  # noqa: E402
from model import evaluate, make_model, warm_up  # noqa: E402
from tqdm import tqdm  # noqa: E402

from fedbus.log import configure as configure_logging  # noqa: E402
from fedbus.log import get_logger  # noqa: E402
from fedbus.modelio import serde  # noqa: E402
from fedbus.recipes import FedAvgRecipe, FedBuffRecipe, Progress, Run, SimEnv, SpeedProfile  # noqa: E402

STRATEGIES = ("fedavg", "fedbuff")
CSV_COLUMNS = (
    "strategy",
    "version",
    "wall_s",
    "client_updates",
    "heldout_acc",
    "train_loss",
    "updates_in_version",
    "mean_staleness",
    "max_staleness",
)
QUICK = {"budget": 25.0}
FULL = {"budget": 90.0}


@dataclass
class Curve:
    """One strategy's trajectory: a row per checkpointed global version, in version order."""

    strategy: str
    rows: list[dict[str, Any]]
    status: str
    reason: str

    def first_reaching(self, target: float) -> dict[str, Any] | None:
        """The first version whose held-out accuracy is at least ``target`` (None: never within budget)."""
        return next((r for r in self.rows if r["heldout_acc"] >= target), None)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=20, help="simulated sites (default 20)")
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet label-skew concentration (0.3)")
    parser.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the site slowdowns (1.0)")
    parser.add_argument("--budget", type=float, default=None, help="wall-clock seconds per strategy (25 quick, 90)")
    parser.add_argument("--target", type=float, default=0.9, help="held-out accuracy to time (0.9)")
    parser.add_argument("--seed", type=int, default=0, help="model init, partition and site speeds (0)")
    parser.add_argument("--quick", action="store_true", help="a short budget: both runs in under two minutes")
    parser.add_argument("--out", type=Path, default=Path("runs/async-experiment"), help="output folder")
    parser.add_argument("--verbose", action="store_true", help="show the broker's and the sites' log lines")
    local = parser.add_argument_group("local training (client.py)")
    local.add_argument("--epochs", type=int, default=2)
    local.add_argument("--lr", type=float, default=0.05)
    local.add_argument("--batch-size", type=int, default=16)
    local.add_argument("--step-ms", type=float, default=40.0, help="simulated device time per local step (40)")
    buff = parser.add_argument_group("FedBuff")
    buff.add_argument("--concurrency", type=int, default=None, help="sites training at once (default: sites / 2)")
    buff.add_argument("--buffer-size", type=int, default=5, help="updates per global version, K (5)")
    buff.add_argument("--server-lr", type=float, default=1.0)
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    if args.budget is None:
        args.budget = preset["budget"]
    if args.concurrency is None:
        args.concurrency = max(1, args.sites // 2)
    return args


def make_recipes(args: argparse.Namespace) -> dict[str, FedAvgRecipe | FedBuffRecipe]:
    """The two jobs: same script, arguments, files, initial model and time budget; only the strategy differs."""
    init = make_model(args.seed).state_dict()
    common: dict[str, Any] = {
        "model": init,
        "train_script": HERE / "client.py",
        "train_args": [
            *("--alpha", args.alpha, "--seed", args.seed, "--epochs", args.epochs, "--lr", args.lr),
            *("--batch-size", args.batch_size, "--step-ms", args.step_ms),
        ],
        "files": [HERE / "data.py", HERE / "model.py"],
        "time_budget": args.budget,
        "min_clients": args.sites,
    }
    return {
        # every site every round; num_rounds only caps it, the budget is what stops it
        "fedavg": FedAvgRecipe("fedavg", num_rounds=100_000, **common),
        "fedbuff": FedBuffRecipe(
            "fedbuff",
            concurrency=args.concurrency,
            buffer_size=args.buffer_size,
            staleness="polynomial",  # 1 / sqrt(1 + s)
            server_lr=args.server_lr,
            **common,
        ),
    }


def _progress_bar(strategy: str, budget: float) -> tuple[Callable[[Progress], None], Callable[[], None]]:
    """A tqdm bar over the run's wall-clock budget (SimEnv's callback), and a function that closes it."""
    fmt = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s {postfix}"
    bar = tqdm(total=budget, desc=f"{strategy:>7}", bar_format=fmt, leave=False, file=sys.stderr, disable=None)

    def update(p: Progress) -> None:
        bar.n = min(p.elapsed_s, budget)
        loss = p.metrics.get("train_loss")
        bar.set_postfix(version=p.version, loss=f"{loss:.3f}" if isinstance(loss, float) else "-", refresh=False)
        bar.refresh()

    return update, bar.close


def curve_of(strategy: str, run: Run, x_heldout: Any, y_heldout: Any) -> Curve:
    """Score every checkpointed version of ``run`` on the held-out set, with its time and update counts."""
    by_version = {h["version"]: h for h in run.history}
    rows = []
    updates = 0
    for version, wall_s, path in sorted(run.checkpoints, key=lambda c: c[0]):
        metrics = by_version.get(version, {}).get("metrics", {}) if version else {}
        n = int(metrics.get("strategy/num_updates", 0))
        updates += n
        rows.append(
            {
                "strategy": strategy,
                "version": version,
                "wall_s": round(float(wall_s), 3),
                "client_updates": updates,
                "heldout_acc": round(evaluate(serde.read_file(path), x_heldout, y_heldout), 4),
                "train_loss": _num(metrics.get("train_loss")),
                "updates_in_version": n if version else "",
                "mean_staleness": _num(metrics.get("strategy/mean_staleness")),
                "max_staleness": _num(metrics.get("strategy/max_staleness")),
            }
        )
    return Curve(strategy, rows, run.status, run.reason)


def _num(value: Any) -> float | str:
    return round(float(value), 4) if isinstance(value, int | float) and math.isfinite(value) else ""


def write_csv(curves: Sequence[Curve], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for c in curves:
            writer.writerows(c.rows)


def plot(curves: Sequence[Curve], target: float, path: Path, title: str) -> None:
    """Two panels, held-out accuracy against wall-clock and against client updates, with the target line."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = {"fedavg": "tab:blue", "fedbuff": "tab:orange"}
    for c in curves:
        t = [r["wall_s"] for r in c.rows]
        u = [r["client_updates"] for r in c.rows]
        acc = [r["heldout_acc"] for r in c.rows]
        hit = c.first_reaching(target)
        label = c.strategy if hit is None else f"{c.strategy}: {target:.0%} at {hit['wall_s']:.1f} s"
        axes[0].plot(t, acc, drawstyle="steps-post", color=colors.get(c.strategy), label=label)
        axes[1].plot(u, acc, drawstyle="steps-post", color=colors.get(c.strategy), label=c.strategy)
        if hit is not None:
            axes[0].plot([hit["wall_s"]], [hit["heldout_acc"]], "o", color=colors.get(c.strategy))
            axes[1].plot([hit["client_updates"]], [hit["heldout_acc"]], "o", color=colors.get(c.strategy))
    for ax, xlabel in zip(axes, ("wall-clock seconds since the job started", "client updates aggregated"), strict=True):
        ax.axhline(target, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    axes[0].set_ylabel("held-out accuracy")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(curves: dict[str, Curve], target: float) -> dict[str, Any]:
    """The JSON line: seconds to the target per strategy, their ratio, final accuracies and update counts."""
    out: dict[str, Any] = {}
    for name, c in curves.items():
        hit = c.first_reaching(target)
        out[f"{name}_s_to_target"] = hit["wall_s"] if hit is not None else None
        out[f"{name}_updates_to_target"] = hit["client_updates"] if hit is not None else None
    fa, fb = out["fedavg_s_to_target"], out["fedbuff_s_to_target"]
    out["ratio"] = round(fb / fa, 3) if fa and fb is not None else None
    if fa is None and fb is not None and curves["fedavg"].rows:
        # FedAvg never got there: the ratio is below FedBuff's time over FedAvg's whole run
        out["ratio_upper_bound"] = round(fb / max(curves["fedavg"].rows[-1]["wall_s"], 1e-9), 3)
    out["target"] = target
    for name, c in curves.items():
        out[f"{name}_final_acc"] = c.rows[-1]["heldout_acc"] if c.rows else None
        out[f"{name}_updates"] = c.rows[-1]["client_updates"] if c.rows else 0
        out[f"{name}_versions"] = c.rows[-1]["version"] if c.rows else 0
    bound = out["ratio"] if out["ratio"] is not None else out.get("ratio_upper_bound")
    out["claim_holds"] = bound is not None and bound <= 0.5
    return out


def print_table(curves: dict[str, Curve], result: dict[str, Any], budget: float) -> None:
    print(f"{'strategy':<9} {'versions':>8} {'updates':>8} {'final acc':>9} {'s to target':>11}  status")
    for name, c in curves.items():
        s = result[f"{name}_s_to_target"]
        s_txt = f"{s:.1f}" if s is not None else f">{budget:g}"
        final = result[f"{name}_final_acc"]
        print(
            f"{name:<9} {result[f'{name}_versions']:>8} {result[f'{name}_updates']:>8} "
            f"{final if final is not None else float('nan'):>9.3f} {s_txt:>11}  {c.status}"
        )


@contextlib.contextmanager
def _log_level(level: str) -> Iterator[None]:
    """fedbus's structlog at ``level`` for the block, the caller's configuration back afterwards."""
    get_logger("async-experiment")  # applies fedbus's default configuration first if nobody configured it yet
    saved = structlog.get_config()
    configure_logging(level=level)
    try:
        yield
    finally:
        structlog.configure(**saved)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run both strategies, write the CSV and the plot, print the table and the JSON line; returns the JSON."""
    started = time.monotonic()
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # the daemons' routine warnings (a late update refused once the budget is spent ...) would drown the bars
    with _log_level("debug" if args.verbose else "error"):
        curves = run_both(args)
    write_csv(curves.values(), args.out / "metrics.csv")
    title = (
        f"{args.sites} sites, Dirichlet alpha={args.alpha:g}, lognormal sigma={args.sigma:g} slowdowns, "
        f"{args.budget:g} s each; FedBuff K={args.buffer_size}, concurrency={args.concurrency}"
    )
    plot(curves.values(), args.target, args.out / "accuracy.png", title)
    result = summary(curves, args.target)
    result["wall_s_total"] = round(time.monotonic() - started, 1)
    print_table(curves, result, args.budget)
    print(f"wrote {args.out / 'metrics.csv'} and {args.out / 'accuracy.png'}")
    print(json.dumps(result))
    return result


def run_both(args: argparse.Namespace) -> dict[str, Curve]:
    """FedAvg, then FedBuff, in a fresh SimEnv each with the same speeds; every checkpoint scored."""
    warm_up()
    x_heldout, y_heldout = data.heldout()
    recipes = make_recipes(args)
    speed = SpeedProfile.lognormal(sigma=args.sigma, seed=args.seed)
    curves: dict[str, Curve] = {}
    with tempfile.TemporaryDirectory(prefix="async-experiment-") as work:
        for name in tqdm(STRATEGIES, desc="strategies", unit="run", file=sys.stderr, disable=None):
            started = time.monotonic()
            update, close = _progress_bar(name, args.budget)
            # num_threads = sites: a task mostly sleeps (--step-ms), so every site may "train" at once
            env = SimEnv(args.sites, num_threads=args.sites, workspace=Path(work) / name, speed=speed, progress=update)
            try:
                run = recipes[name].execute(env)
            finally:
                close()
            curves[name] = curve_of(name, run, x_heldout, y_heldout)
            tqdm.write(f"{name}: {run.status} ({run.reason}) in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return curves


if __name__ == "__main__":
    if "--large" in sys.argv[1:]:
        import large

        large.main([a for a in sys.argv[1:] if a != "--large"])
    else:
        main()
