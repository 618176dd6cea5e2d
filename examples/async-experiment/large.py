"""The large mode of the async experiment: 1,000 sites on simulated time (``run.py --large``).

    python examples/async-experiment/run.py --large               # 1,000 sites, 2 simulated hours each
    python examples/async-experiment/run.py --large --sim-hours 1 --sites 200

FedBuff (K=10, concurrency 100) against FedAvg (100 sites a round) on Synthetic(1, 1) (the FedProx paper's
benchmark, generated locally: ``synthetic.py``) over ``--sites`` sites, on ``SimEnv(clock="simulated")``: the
real broker runs, the sites are records trained by a pool of workers, and every duration is simulated: a task
takes ``--task-s`` simulated seconds times the site's lognormal(``--sigma``) slowdown. Each strategy gets the same
simulated time budget; every global version is scored on the held-out 20% of every device. Output under ``--out``:
``metrics-large.csv`` (one row per version: simulated hours, wall seconds, updates, held-out accuracy) and
``accuracy-large.png`` (accuracy against simulated hours and against client updates); the last line on stdout
is one JSON object. Runs are reproducible: the same arguments give the same curves.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fedbus.modelio import serde
from fedbus.recipes import FedAvgRecipe, FedBuffRecipe, Progress, Run, SimEnv, SpeedProfile

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import synthetic  # noqa: E402

COLUMNS = ("strategy", "version", "sim_h", "wall_s", "client_updates", "heldout_acc", "mean_staleness")


def _gpus(value: str | None) -> int | str | None:
    """``--gpus``: None (CPU threads), "auto", or a number of devices."""
    return int(value) if value is not None and value.isdigit() else value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=1000)
    p.add_argument("--sim-hours", type=float, default=2.0, help="simulated time budget per strategy (2)")
    p.add_argument("--task-s", type=float, default=60.0, help="simulated seconds of a task at speed 1 (60)")
    p.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the site slowdowns (1.0)")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="worker threads (default: cores)")
    p.add_argument("--gpus", default=None, help="train on CUDA: 'auto' (every visible device) or a number of devices")
    p.add_argument("--workers-per-gpu", type=int, default=4, help="worker threads per GPU (4)")
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--buffer-size", type=int, default=10)
    p.add_argument("--per-round", type=int, default=100, help="FedAvg sites per round (100)")
    p.add_argument("--target", type=float, default=0.25, help="held-out accuracy to time (0.25)")
    p.add_argument("--out", type=Path, default=Path("runs/async-experiment"))
    return p.parse_args(argv)


def make_recipes(args: argparse.Namespace) -> dict[str, FedAvgRecipe | FedBuffRecipe]:
    init = {
        "linear.weight": torch.zeros(synthetic.CLASSES, synthetic.DIM),
        "linear.bias": torch.zeros(synthetic.CLASSES),
    }
    common: dict[str, Any] = {
        "model": init,
        "train_script": HERE / "synthetic_client.py",
        "train_args": ["--alpha", args.alpha, "--beta", args.beta, "--seed", args.seed],
        "files": [HERE / "synthetic.py"],
        "time_budget": args.sim_hours * 3600,
    }
    return {
        "fedavg": FedAvgRecipe(
            "fedavg-large", num_rounds=100_000, min_clients=args.per_round, max_clients=args.per_round, **common
        ),
        "fedbuff": FedBuffRecipe(
            "fedbuff-large",
            min_clients=args.concurrency,
            concurrency=args.concurrency,
            buffer_size=args.buffer_size,
            staleness="polynomial",
            **common,
        ),
    }


def accuracy(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    p = serde.read_file(path)
    return float(((x @ p["linear.weight"].T + p["linear.bias"]).argmax(1) == y).float().mean())


def curve(name: str, run: Run, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, Any]]:
    by_version = {h["version"]: h for h in run.history}
    rows, updates = [], 0
    for version, wall_s, path in sorted(run.checkpoints, key=lambda c: c[0]):
        h = by_version.get(version, {})
        metrics = h.get("metrics", {}) if version else {}
        updates += int(metrics.get("strategy/num_updates", 0))
        stale = metrics.get("strategy/mean_staleness")
        rows.append(
            {
                "strategy": name,
                "version": version,
                "sim_h": round(float(h.get("sim_time", 0.0)) / 3600, 4),
                "wall_s": round(float(wall_s), 3),
                "client_updates": updates,
                "heldout_acc": round(accuracy(path, x, y), 4),
                "mean_staleness": round(float(stale), 3) if stale is not None else "",
            }
        )
    return rows


def plot(curves: dict[str, list[dict[str, Any]]], target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = {"fedavg": "tab:blue", "fedbuff": "tab:orange"}
    for name, rows in curves.items():
        acc = [r["heldout_acc"] for r in rows]
        axes[0].plot([r["sim_h"] for r in rows], acc, drawstyle="steps-post", color=colors[name], label=name)
        axes[1].plot([r["client_updates"] for r in rows], acc, drawstyle="steps-post", color=colors[name], label=name)
    for ax, xlabel in zip(axes, ("simulated hours", "client updates aggregated"), strict=True):
        ax.axhline(target, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    axes[0].set_ylabel("held-out accuracy")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def first_reaching(rows: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    return next((r for r in rows if r["heldout_acc"] >= target), None)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    x_np, y_np = synthetic.heldout(args.sites, args.alpha, args.beta, args.seed)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    speed = SpeedProfile.lognormal(sigma=args.sigma, seed=args.seed)
    curves: dict[str, list[dict[str, Any]]] = {}
    result: dict[str, Any] = {"sites": args.sites, "sim_hours": args.sim_hours, "target": args.target}
    with tempfile.TemporaryDirectory(prefix="async-large-") as work:
        for name, recipe in make_recipes(args).items():
            bar = tqdm(total=args.sim_hours, desc=f"{name:>7}", unit="sim h", file=sys.stderr, disable=None)
            bar.bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n:.2f}/{total:.2f} simulated h {postfix}"
            env = SimEnv(
                args.sites,
                num_threads=args.workers,
                gpus=_gpus(args.gpus),
                workers_per_gpu=args.workers_per_gpu,
                clock="simulated",
                train_s=args.task_s,
                speed=speed,
                seed=args.seed,
                workspace=Path(work) / name,
                log_config="error",
            )

            def update(p: Progress, env: SimEnv = env, bar: tqdm = bar) -> None:
                bar.n = min(env.sim_now() / 3600, args.sim_hours)
                bar.set_postfix(version=p.version, refresh=False)
                bar.refresh()

            env.progress = update
            t0 = time.monotonic()
            try:
                run = recipe.execute(env)
            finally:
                bar.close()
            curves[name] = curve(name, run, x, y)
            hit = first_reaching(curves[name], args.target)
            result[name] = {
                "status": run.status,
                "versions": curves[name][-1]["version"],
                "updates": curves[name][-1]["client_updates"],
                "final_acc": curves[name][-1]["heldout_acc"],
                "sim_h_to_target": hit["sim_h"] if hit else None,
                "updates_to_target": hit["client_updates"] if hit else None,
                "wall_s": round(time.monotonic() - t0, 1),
            }
            tqdm.write(f"{name}: {run.status} ({run.reason}) in {result[name]['wall_s']} s", file=sys.stderr)
    with (args.out / "metrics-large.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for rows in curves.values():
            writer.writerows(rows)
    title = (
        f"{args.sites} sites, Synthetic({args.alpha:g}, {args.beta:g}), lognormal sigma={args.sigma:g}; FedBuff "
        f"K={args.buffer_size}, concurrency={args.concurrency}; FedAvg {args.per_round}/round; {args.sim_hours:g} h"
    )
    plot(curves, args.target, args.out / "accuracy-large.png", title)
    result["wall_s_total"] = round(time.monotonic() - started, 1)
    for name in curves:
        r = result[name]
        print(
            f"{name:<8} versions={r['versions']} updates={r['updates']} final_acc={r['final_acc']:.3f} "
            f"sim_h_to_target={r['sim_h_to_target']} wall_s={r['wall_s']}"
        )
    print(f"wrote {args.out / 'metrics-large.csv'} and {args.out / 'accuracy-large.png'}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
