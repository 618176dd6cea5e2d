"""The `fedbus` command's surface: --help on every command, --version, usage errors (exit 2, one line),
failures (exit 1, one line, a traceback only with --debug), environment overrides, and the broker's
--metrics-port on a real broker process."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from fedbus.cli import _status_table, _version, build_parser, main
from fedbus.config import ENV_OVERRIDES, BrokerConfig, SiteConfig, load_config
from fedbus.errors import ConfigError
from tests.broker.test_metrics import free_port
from tests.e2e.procs import FEDBUS, ROOT, start_broker

pytestmark = pytest.mark.timeout(60)


def commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser, e.g. ('bench', 'transfer'), found by introspection."""
    out = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += commands(sub, (*prefix, name))
    return out


ALL = commands(build_parser())


def parser_of(path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def required_args(path: tuple[str, ...]) -> list[str]:
    """A placeholder for each required argument (positional or flag) of a leaf command."""
    out: list[str] = []
    for a in parser_of(path)._actions:
        if not a.option_strings and a.nargs != "?" and a.choices is None:
            out.append("x")
        elif a.option_strings and a.required:
            out += [a.option_strings[0], "x"]
    return out


def run(*args: str, **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDBUS, *args], cwd=ROOT, capture_output=True, text=True, timeout=30, **kw)  # type: ignore[call-overload]


def test_the_parser_has_the_documented_commands() -> None:
    names = {c[0] for c in ALL if c}
    assert {"broker", "site", "submit", "status", "abort", "download", "bench"} <= names
    assert ("bench", "transfer") in ALL and ("bench", "round") in ALL


@pytest.mark.parametrize("path", ALL, ids=lambda p: " ".join(p) or "fedbus")
def test_help_on_every_command(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fedbus {' '.join(path)}".rstrip())
    assert "--help" in out


@pytest.mark.parametrize("path", ALL, ids=lambda p: " ".join(p) or "fedbus")
def test_a_bad_argument_exits_2_with_one_line(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    leaf = "COMMAND" not in (usage := parser_of(path).format_usage()) and "BENCH" not in usage
    with pytest.raises(SystemExit) as exc:
        main([*path, *required_args(path), "--no-such-flag"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert ("--no-such-flag" if leaf else "required") in err
    assert err.startswith("fedbus") and ": error: " in err and "--help)" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedbus {_version()}"
    res = run("--version")  # and as a real process
    assert res.returncode == 0 and res.stdout.startswith("fedbus ")


def test_bad_values_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["broker", "--metrics-port", "x"],
        ["broker", "--metrics-port", "-1"],
        ["bench", "round", "--sites", "0"],
        ["status", "--timeout", "-1"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
        assert capsys.readouterr().err.count("\n") == 1


def test_a_failure_is_one_line_and_debug_shows_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.toml"
    res = run("broker", "--config", str(missing))  # a real process: exit code and stderr as a shell sees them
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and str(missing) in res.stderr and "Traceback" not in res.stderr
    with pytest.raises(ConfigError, match="nope.toml"):  # --debug lets the exception (and its traceback) out
        main(["--debug", "broker", "--config", str(missing)])
    bad = tmp_path / "bad.toml"
    bad.write_text("heartbeat = 1\n")
    assert main(["broker", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err == f"fedbus: error: {bad}: unknown key 'heartbeat' (did you mean 'heartbeat_s'?)\n"


def test_environment_overrides_addresses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    nobody = f"ipc://{tmp_path}/nobody.sock"
    monkeypatch.setenv("FEDBUS_BROKER", nobody)
    monkeypatch.delenv("FEDBUS_KIT", raising=False)
    assert main(["status", "--timeout", "0.5"]) == 1
    assert nobody in capsys.readouterr().err
    flag = f"ipc://{tmp_path}/flag.sock"
    assert main(["status", "--timeout", "0.5", "--broker", flag]) == 1
    assert flag in capsys.readouterr().err  # a flag beats the environment
    env = {"FEDBUS_BIND": "tcp://0.0.0.0:7000", "FEDBUS_METRICS_PORT": "9100", "FEDBUS_METRICS_HOST": "0.0.0.0"}
    cfg = load_config(BrokerConfig, ROOT / "brokers/local.toml", {"metrics_port": 9200}, environ=env)
    assert (cfg.bind, cfg.metrics_port, cfg.metrics_host) == ("tcp://0.0.0.0:7000", 9200, "0.0.0.0")
    assert ENV_OVERRIDES["BrokerConfig"]["FEDBUS_METRICS_PORT"] == "metrics_port"


def test_broker_metrics_port_flag_serves_metrics(tmp_path: Path) -> None:
    port = free_port()
    broker, _ = start_broker(tmp_path, "--metrics-port", str(port))
    try:
        rec = broker.wait_for("metrics listening")
        assert rec["url"] == f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(rec["url"], timeout=10) as resp:
            body = resp.read().decode()
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert "fedbus_sites_connected 0" in body and 'fedbus_jobs{state="running"} 0' in body
    finally:
        assert broker.stop() == 0


def test_the_broker_lets_idle_openmp_threads_sleep_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # OMP_WAIT_POLICY only counts if it is set before torch loads OpenMP: importing the CLI must not load torch.
    probe = "import sys, fedbus.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "False\n"
    seen = []

    class Recorder:  # the daemon itself is not what is tested here: what the environment is when it starts
        def __init__(self, cfg: BrokerConfig) -> None:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))

        def run(self) -> None:
            pass

    monkeypatch.setattr("fedbus.broker.Broker", Recorder)
    monkeypatch.setattr("fedbus._memory.freeze_startup_objects", lambda: None)  # not in the test process
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["broker", "--workspace", str(tmp_path / "a")]) == 0
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # an operator's choice is kept
    assert main(["broker", "--workspace", str(tmp_path / "b")]) == 0
    assert seen == ["PASSIVE", "ACTIVE"]


DOCS = [ROOT / "README.md", ROOT / "deploy" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_commands() -> list[tuple[str, str]]:
    """(file, line) for every `fedbus ...` line of a bash block in the README, deploy/README and docs/."""
    out = []
    for path in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.DOTALL):
            for line in block.splitlines():
                cmd = re.sub(r"\s+#.*$", "", line).strip()
                cmd = re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", cmd)  # leading VAR=value assignments
                if cmd.startswith("fedbus "):
                    out.append((path.name, cmd.split("&&")[0].strip()))
    return out


def test_every_documented_command_parses() -> None:
    found = documented_commands()
    assert len(found) >= 15
    for where, cmd in found:
        try:
            build_parser().parse_args(shlex.split(cmd)[1:])
        except SystemExit:
            pytest.fail(f"{where}: `{cmd}` is refused by the CLI")


def test_links_between_docs_resolve() -> None:
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" not in target:
                assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to a missing {target}"


def test_environment_overrides_key_paths_of_a_kit(tmp_path: Path) -> None:
    provision = pytest.importorskip("fedbus.provision")
    project = tmp_path / "project.toml"
    project.write_text('name = "t"\nbroker = "tcp://127.0.0.1:7788"\n[[participant]]\nname = "site-1"\nrole = "site"\n')
    provision.provision(project, tmp_path / "kits")
    kit = tmp_path / "kits" / "site-1"
    plain = load_config(SiteConfig, kit / "site.toml", {}, environ={})
    assert (plain.secret_key, plain.broker_key) == (str(kit / "site-1.key_secret"), str(kit / "broker.key"))
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in ("site-1.key_secret", "broker.key"):
        (moved / name).write_bytes((kit / name).read_bytes())
    (moved / "site-1.key_secret").chmod(0o600)
    env = {
        "FEDBUS_BROKER": "tcp://10.1.2.3:7000",
        "FEDBUS_SECRET_KEY": str(moved / "site-1.key_secret"),
        "FEDBUS_BROKER_KEY": str(moved / "broker.key"),
    }
    cfg = load_config(SiteConfig, kit / "site.toml", {}, environ=env)
    assert (cfg.broker, cfg.secret_key, cfg.broker_key) == tuple(env.values())
    flagged = load_config(SiteConfig, kit / "site.toml", {"broker": "tcp://10.9.9.9:1"}, environ=env)
    assert flagged.broker == "tcp://10.9.9.9:1"  # a flag beats the environment


def test_status_table_shows_sites_and_jobs() -> None:
    data = {
        "sites": [
            {"name": "site-1", "online": True, "jobs": ["j-1"]},
            {"name": "site-2", "online": False, "jobs": []},
        ],
        "jobs": [
            {
                "id": "j-1",
                "state": "running",
                "version": 3,
                "reason": "",
                "last_metrics": {"loss": 0.25, "strategy/accepted": 6},
                "live": {"strategy": {"strategy": "fedbuff", "phase": "train", "busy": 2, "accepted": 6}},
                "seconds_per_version": [0.5, 0.4],
            },
            {"id": "j-0", "state": "failed", "version": 0, "reason": "cannot start: no model", "last_metrics": {}},
        ],
    }
    lines = _status_table(data).splitlines()
    assert lines[0].split() == ["SITE", "ONLINE", "JOBS"]
    assert lines[1].split() == ["site-1", "yes", "j-1"] and lines[2].split() == ["site-2", "no"]
    assert lines[4].split()[:4] == ["JOB", "STATE", "VERSION", "METRICS"]
    assert lines[5].split() == ["j-1", "running", "3", "loss=0.25"]
    assert "fedbuff train busy=2 accepted=6" in lines[6]
    assert any(ln.split()[:3] == ["j-0", "failed", "0"] for ln in lines)
    assert "    cannot start: no model" in lines
