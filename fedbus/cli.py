"""The ``fedbus`` command: the only place that exits.

Exit codes: 0 success, 1 a failure (a fedbus error, shown as one line; ``--debug`` for the traceback),
2 a usage error (argparse). Addresses and paths also come from the environment (``FEDBUS_BROKER``,
``FEDBUS_BIND``), below flags and above config files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NoReturn

from fedbus.errors import FedbusError

DEFAULT_BROKER = "tcp://127.0.0.1:7788"


def _version() -> str:
    try:
        return version("fedbus")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit 2), naming the command and where to read more."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedbus", description="Federated learning on a ZeroMQ message bus.")
    p.add_argument("--version", action="version", version=f"fedbus {_version()}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("broker", help="run the broker daemon")
    b.add_argument("--config", help="broker profile (TOML), e.g. brokers/local.toml")
    b.add_argument("--bind", help="address to bind (default tcp://127.0.0.1:7788; env FEDBUS_BIND)")
    b.add_argument("--workspace", help="folder for the job store and checkpoints")
    b.add_argument(
        "--metrics-port",
        type=_port,
        help="serve Prometheus metrics on this HTTP port (env FEDBUS_METRICS_PORT; 0: off)",
    )
    _log_flags(b)

    s = sub.add_parser("site", help="run a site daemon")
    s.add_argument("--name", help="this site's name (letters, digits, _ . -)")
    s.add_argument("--broker", help="broker address (env FEDBUS_BROKER)")
    s.add_argument("--workspace", help="folder for deployed jobs")
    s.add_argument("--config", help="site config (TOML)")
    _log_flags(s)

    sm = sub.add_parser("submit", help="submit a job folder")
    sm.add_argument("folder", help="job folder with job.toml, the script and the initial model")
    sm.add_argument("--wait", action="store_true", help="follow the job until it ends")
    _broker_flag(sm)

    st = sub.add_parser("status", help="show sites and jobs")
    st.add_argument("job", nargs="?", help="one job id")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _broker_flag(st)

    ab = sub.add_parser("abort", help="abort a job")
    ab.add_argument("job")
    _broker_flag(ab)

    dl = sub.add_parser("download", help="download a job's final model and metrics")
    dl.add_argument("job")
    dl.add_argument("-o", "--output", default=".", help="folder to write model.safetensors and history.json")
    _broker_flag(dl)

    pv = sub.add_parser("provision", help="write a startup kit (keys, config) for every participant of a project")
    pv.add_argument("project", help="project file (TOML): name, broker, [[participant]] name/role, revoked")
    pv.add_argument("-o", "--output", required=True, help="folder for the kits (existing keys are kept)")

    au = sub.add_parser("audit", help="read an audit log (WORKSPACE/audit.jsonl of a broker or site)")
    au.add_argument("path", help="the audit.jsonl file")
    au.add_argument("--job", help="only records of this job")
    au.add_argument("--site", help="only records involving this site")
    au.add_argument("--kind", help="only records of this kind (e.g. update_sent, refused)")
    au.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    au.add_argument(
        "--privacy", action="store_true", help="the differential-privacy epsilon spent per job and site (a site's log)"
    )

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    tr = bsub.add_parser("transfer", help="stream one model between two processes vs raw ZeroMQ")
    tr.add_argument("--size-mb", type=_positive_float, default=256)
    tr.add_argument("--chunk-mb", type=_positive_float, help="chunk size (default: the transport's, 2 MiB)")
    tr.add_argument("--window-mb", type=_positive_float, help="credit window (default: the transport's, 64 MiB)")
    tr.add_argument("--transport", choices=("tcp", "ipc"), default="tcp")
    tr.add_argument("--curve", action="store_true", help="CurveZMQ-encrypt the fedbus stream (and the raw baseline)")
    tr.add_argument("--device", default="cpu", help="where the model lives, e.g. cuda: sent as flare.send does")
    tr.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    tr.add_argument("--repeat", type=_positive_int, default=3, help="runs of the whole sequence; the median is shown")
    tr.add_argument("--lanes", type=_positive_int, help="connections the chunks are spread over (default: a site's)")
    rd = bsub.add_parser("round", help="whole rounds on real broker and site processes, random models, no training")
    rd.add_argument("--size-mb", type=_positive_float, default=64)
    rd.add_argument("--sites", type=_positive_int, default=4)
    rd.add_argument("--rounds", type=_positive_int, default=4, help="versions (>= 2: the first is not timed)")
    rd.add_argument("--strategy", choices=("fedavg", "fedbuff"), default="fedavg")
    rd.add_argument("--logs", type=Path, help="copy the daemons' logs (JSON lines, debug level) into this folder")
    rd.add_argument("--broker-config", type=Path, help="the broker's profile (TOML), e.g. brokers/local.toml")
    rd.add_argument("--he", action="store_true", help="run it again with homomorphic encryption (CKKS) and compare")
    rd.add_argument("--secagg", action="store_true", help="plain FedAvg, then with secure aggregation: both, compared")
    rd.add_argument("--curve", action="store_true", help="every connection over CURVE, keys from fedbus provision")
    rd.add_argument("--layout", choices=("blocks", "llama-7b"), default="blocks", help="llama-7b ignores --size-mb")
    rd.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    rd.add_argument("--layers", type=_positive_int, default=32, help="transformer layers of --layout llama-7b")
    ck = bsub.add_parser("ckks", help="CKKS parameter candidates for encrypted jobs: speed against precision")
    ck.add_argument("--values", type=_positive_int, default=262144, help="values a model holds (a quarter million)")
    ck.add_argument("--sites", type=_positive_int, default=4, help="updates folded")
    pg = bsub.add_parser("prg", help="secure aggregation's mask generators: seconds and GB/s on this machine")
    pg.add_argument("--size-mb", type=_positive_float, default=100)
    sc = bsub.add_parser("scale", help="many simulated sites on one broker: FedBuff updates/s, heartbeat latency")
    sc.add_argument("--sites", type=_positive_int, default=1000)
    sc.add_argument("--size-kb", type=_positive_float, default=100)
    sc.add_argument("--seconds", type=_positive_float, default=20)
    sc.add_argument("--procs", type=_positive_int, default=2, help="processes the simulated sites share")
    sc.add_argument("--buffer", type=_positive_int, default=50, help="FedBuff buffer_size")
    sc.add_argument("--heartbeat-s", type=_positive_float, default=1.0)
    sc.add_argument(
        "--sim-nice",
        type=int,
        choices=range(20),
        default=10,
        metavar="0-19",
        help="niceness of the simulator processes (they stand in for other machines; 0: equal shares)",
    )
    sm = bsub.add_parser("sim", help="SimEnv on simulated time: overhead per update, updates/s, RSS at many sites")
    sm.add_argument("--sites", type=_positive_int, nargs="+", default=[1000, 10000])
    sm.add_argument("--size-kb", type=_positive_float, default=100)
    sm.add_argument("--updates", type=_positive_int, default=2000)
    sm.add_argument("--workers", type=_positive_int, default=2)
    sm.add_argument("--pool", choices=("threads", "ray", "ray-inline"), default="threads", help="who trains (threads)")
    fz = bsub.add_parser("fuzz", help="hostile generated input for every trust boundary, and a real broker socket")
    fz.add_argument("--inputs", type=_positive_int, default=100_000)
    fz.add_argument("--seed", type=int, default=0)
    fz.add_argument(
        "--target", choices=("envelope", "chunk", "header", "job", "config", "cli", "broker", "all"), default="all"
    )
    ab = bsub.add_parser("abuse", help="hostile peers of every kind against a broker serving good sites' FedBuff job")
    ab.add_argument("--sites", type=_positive_int, default=4, help="good sites")
    ab.add_argument("--attackers", type=_positive_int, default=4, help="hostile peers of each kind")
    ab.add_argument(
        "--attacks",
        default="refused,bytes,slowloris,reconnect,nonreading",
        help="comma-separated: refused, bytes, slowloris, reconnect, nonreading",
    )
    ab.add_argument("--seconds", type=_positive_float, default=5.0, help="each of the quiet and attack phases")
    ab.add_argument("--recover-s", type=_positive_float, default=4.0, help="the phase after the attackers left")
    ab.add_argument("--size-kb", type=_positive_float, default=256, help="the job's model")
    abm = ab.add_mutually_exclusive_group()
    abm.add_argument("--curve", dest="modes", action="store_const", const=("curve",), help="only with CurveZMQ")
    abm.add_argument("--plain", dest="modes", action="store_const", const=("plain",), help="only in plaintext")
    ab.add_argument(
        "--shared", action="store_true", help="one broker takes every attack in turn (default: a broker per attack)"
    )
    ab.add_argument(
        "--attacker-nice",
        type=int,
        choices=range(20),
        default=10,
        metavar="0-19",
        help="niceness of the attackers' process (they stand in for other machines; 0: equal shares)",
    )
    ab.add_argument("--json", action="store_true", help="print only the JSON figures")
    sk = bsub.add_parser("soak", help="a FedBuff job on site processes under random SIGKILLs of sites and the broker")
    sk.add_argument("--sites", type=_positive_int, default=20)
    sk.add_argument("--minutes", type=_positive_float, default=10.0)
    sk.add_argument("--kill-every", type=_positive_float, default=30.0, help="seconds between kills")
    sk.add_argument("--seed", type=int, default=0)
    return p


def _log_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-json", action="store_true", default=None, help="log JSON lines")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))


def _broker_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default=None, help=f"broker address (env FEDBUS_BROKER, default {DEFAULT_BROKER})")
    p.add_argument("--kit", default=None, help="admin startup kit folder with admin.toml (env FEDBUS_KIT)")
    p.add_argument("--timeout", type=_positive_float, default=30.0, help="seconds to wait for the broker")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}: {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)
_port = _int_at_least(0)


def _broker_address(args: argparse.Namespace) -> str:
    return args.broker or os.environ.get("FEDBUS_BROKER") or DEFAULT_BROKER


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130
    except (FedbusError, OSError) as exc:  # OSError: a file or folder the user named (download -o, --config)
        if args.debug:
            raise
        sys.stderr.write(f"fedbus: error: {exc}\n")
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    from fedbus import log

    if args.command == "broker":
        # Set before torch loads OpenMP: the broker's torch work is a few large folds a round, after each of which
        # OpenMP's idle threads would spin for a while on cores its I/O and placement threads need.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from fedbus._memory import freeze_startup_objects
        from fedbus.broker import Broker
        from fedbus.config import BrokerConfig, load_config

        cfg = load_config(
            BrokerConfig, args.config, _overrides(args, "bind", "workspace", "metrics_port", "log_json", "log_level")
        )
        log.configure(json=cfg.log_json or None, level=cfg.log_level)
        freeze_startup_objects()
        Broker(cfg).run()
        return 0
    if args.command == "site":
        from fedbus._memory import freeze_startup_objects
        from fedbus.config import SiteConfig, load_config
        from fedbus.site import Site

        site_cfg = load_config(
            SiteConfig, args.config, _overrides(args, "name", "broker", "workspace", "log_json", "log_level")
        )
        log.configure(json=site_cfg.log_json or None, level=site_cfg.log_level)
        freeze_startup_objects()
        Site(site_cfg).run()
        return 0
    if args.command == "provision":
        from fedbus.provision import provision

        summary = provision(args.project, args.output)
        sys.stdout.write(json.dumps(summary) + "\n")
        return 0
    if args.command == "audit":
        from fedbus import audit

        records = audit.select(audit.read_audit(args.path), job=args.job, site=args.site, kind=args.kind)
        if args.privacy:
            rows = audit.privacy_spent(records)
            text = "\n".join(json.dumps(r) for r in rows) if args.json else audit.format_privacy(rows)
        else:
            text = "\n".join(json.dumps(r) for r in records) if args.json else audit.format_table(records)
        sys.stdout.write(text + ("\n" if text else ""))
        return 0
    if args.command == "bench":
        if args.bench == "transfer":
            from fedbus.bench.transfer import run_transfer

            given = (("chunk_mb", args.chunk_mb), ("window_mb", args.window_mb), ("lanes", args.lanes))
            options = {k: v for k, v in given if v is not None}
            report = run_transfer(
                args.size_mb,
                transport=args.transport,
                **options,
                curve=args.curve,
                device=args.device,
                dtype=args.dtype,
                repeat=args.repeat,
            )
        elif args.bench == "round" and args.secagg:
            from fedbus.bench.secagg import run_secagg_round

            report = run_secagg_round(args.size_mb, args.sites, args.rounds)
        elif args.bench == "prg":
            from fedbus.bench.secagg import run_prg

            report = run_prg(args.size_mb)
        elif args.bench == "round":
            from fedbus.bench.round import run_round

            report = run_round(
                args.size_mb,
                args.sites,
                args.rounds,
                args.strategy,
                logs=args.logs,
                broker_config=args.broker_config,
                he=args.he,
                layout=args.layout,
                dtype=args.dtype,
                layers=args.layers,
                curve=args.curve,
            )
        elif args.bench == "ckks":
            from fedbus.bench.ckks import run_ckks

            report = run_ckks(args.values, args.sites)
        elif args.bench == "scale":
            from fedbus.bench.scale import run_scale

            report = run_scale(
                args.sites, args.size_kb, args.seconds, args.procs, args.buffer, args.heartbeat_s, args.sim_nice
            )
        elif args.bench == "sim":
            from fedbus.bench.sim import run_sim

            report = run_sim(tuple(args.sites), args.size_kb, args.updates, args.workers, pool=args.pool)
        elif args.bench == "fuzz":
            from fedbus.bench.fuzz import run_fuzz

            report, figures = run_fuzz(args.inputs, args.seed, args.target)
            sys.stdout.write(report + "\n")
            return 1 if figures["findings"] else 0
        elif args.bench == "abuse":
            from fedbus.bench.abuse import run_abuse

            report, figures = run_abuse(
                sites=args.sites,
                attackers=args.attackers,
                attacks=[a.strip() for a in args.attacks.split(",") if a.strip()],
                seconds=args.seconds,
                recover_s=args.recover_s,
                modes=args.modes or ("plain", "curve"),
                size_kb=args.size_kb,
                fresh=not args.shared,
                attacker_nice=args.attacker_nice,
            )
            sys.stdout.write((json.dumps(figures) if args.json else report) + "\n")
            return 1 if figures["failed"] else 0
        else:
            from fedbus.bench.soak import run_soak

            report, figures = run_soak(args.sites, args.minutes, args.kill_every, args.seed)
            sys.stdout.write(report + "\n")
            return 1 if figures["lost"] else 0
        sys.stdout.write(report + "\n")
        return 0
    log.configure(level="warning")
    return asyncio.run(_admin_command(args))


def _overrides(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


async def _admin_command(args: argparse.Namespace) -> int:
    from fedbus.admin import Admin

    kit = args.kit or os.environ.get("FEDBUS_KIT")
    if kit:
        from fedbus.admin import from_kit

        connection = from_kit(kit, timeout=args.timeout)
        if args.broker:  # a flag still wins over the kit's address
            connection.address = args.broker
    else:
        connection = Admin(_broker_address(args), timeout=args.timeout)
    async with connection as admin:
        if args.command == "submit":
            job_id = await admin.submit(args.folder)
            sys.stdout.write(job_id + "\n")
            if args.wait:
                return await _follow(admin, job_id)
            return 0
        if args.command == "status":
            data = await admin.status(args.job)
            sys.stdout.write((json.dumps(data, indent=2) if args.json else _status_table(data)) + "\n")
            return 0
        if args.command == "abort":
            await admin.abort(args.job)
            sys.stdout.write(f"aborted {args.job}\n")
            return 0
        if args.command == "download":
            data = await admin.download(args.job, args.output)
            path = os.path.join(args.output, "history.json")
            with open(path, "w") as f:
                json.dump(data, f, indent=2)
            sys.stdout.write(f"{data.get('model_path') or 'no model yet'}\n{path}\n")
            return 0
    raise AssertionError(args.command)


async def _follow(admin: Any, job_id: str) -> int:
    last = None
    while True:
        job = (await admin.status(job_id))["jobs"][0]
        line = f"{job['state']} version {job['version']} {job.get('last_metrics') or ''}".rstrip()
        if job.get("waiting_for"):  # printed once, and again only when it changes
            line = f"waiting: {job['waiting_for']}"
        if line != last:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            last = line
        if job["state"] in ("finished", "failed", "aborted"):
            return 0 if job["state"] == "finished" else 1
        await asyncio.sleep(1.0)


def _status_table(data: dict[str, Any]) -> str:
    lines = ["SITE                 ONLINE  JOBS"]
    for s in data["sites"]:
        lines.append(f"{s['name']:<20} {'yes' if s['online'] else 'no':<7} {','.join(s['jobs'])}")
    lines.append("")
    lines.append("JOB                          STATE      VERSION  METRICS")
    for j in data["jobs"]:
        metrics = " ".join(f"{k}={v:.4g}" for k, v in j.get("last_metrics", {}).items() if isinstance(v, float))
        lines.append(f"{j['id']:<28} {j['state']:<10} {j['version']:<8} {metrics[:80]}")
        if j["reason"]:
            lines.append(f"    {j['reason']}")
        if j.get("waiting_for"):
            lines.append(f"    waiting: {j['waiting_for']}")
        live = j.get("live", {}).get("strategy", {})
        if live:
            keys = ("busy", "buffered", "accepted", "rejected", "dropped_stale")
            counters = " ".join(f"{k}={live[k]}" for k in keys if k in live)
            lines.append(f"    {live.get('strategy', '')} {live.get('phase', '')} {counters}")
            if live.get("staleness_hist"):
                lines.append(f"    staleness histogram {live['staleness_hist']}")
        if j.get("seconds_per_version"):
            lines.append(f"    seconds per version (latest) {j['seconds_per_version']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
