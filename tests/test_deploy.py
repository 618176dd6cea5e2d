"""deploy/ is checked without a container engine: every file parses, and every command, flag, port, path and
environment variable that the Dockerfile, the compose file, the Kubernetes manifests and the systemd units
use exists in the `fedbus` CLI (found by introspecting its parser and config classes) and agrees across
files. The kits they name are made by the real `fedbus provision` on deploy/project.toml."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from fedbus.cli import build_parser
from fedbus.config import ENV_OVERRIDES, BrokerConfig, load_config

yaml = pytest.importorskip("yaml", reason="PyYAML (the dev extra) parses the compose file and the manifests")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
pytestmark = pytest.mark.timeout(60)

BUS_PORT, METRICS_PORT = 7788, 9100
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"fedbus:{VERSION}"
DOCKER_INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "USER", "EXPOSE", "ENTRYPOINT", "CMD", "LABEL"}
SYSTEMD_SECTIONS = {"Unit", "Service", "Install"}


# --- parsers ---------------------------------------------------------------------------------------------


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        assert word in DOCKER_INSTRUCTIONS, f"{path.name}: unknown instruction {word!r}"
        out.append((word, rest.strip()))
    assert not pending, f"{path.name}: ends inside a continued line"
    return out


def systemd_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of key -> values (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            name = line.strip("[]")
            assert line.endswith("]") and name in SYSTEMD_SECTIONS, f"{path.name}:{n}: bad section {line!r}"
            current = sections.setdefault(name, {})
            continue
        key, eq, value = line.partition("=")
        assert eq and current is not None and re.fullmatch(r"[A-Za-z]+", key), f"{path.name}:{n}: {line!r}"
        current.setdefault(key, []).append(value)
    return sections


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; commented-out assignments are returned too (they are documentation to check)."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(\S*)", line)
        if m:
            out[m[1]] = m[2]
        else:
            assert not line.strip() or line.startswith("#"), f"{path.name}: {line!r}"
    return out


def yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def k8s_objects() -> list[dict[str, Any]]:
    return [d for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml_docs(p) if "apiVersion" in d]


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in k8s_objects() if o["kind"] == "Deployment"]


def systemd_argv(unit: dict[str, dict[str, list[str]]], instance: str) -> list[str]:
    (exec_start,) = unit["Service"]["ExecStart"]
    argv = shlex.split(exec_start.replace("%i", instance))
    assert argv[0].endswith("/fedbus"), exec_start
    return argv[1:]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# --- the commands every file runs ----------------------------------------------------------------------------


def fedbus_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `fedbus`) for every fedbus invocation in deploy/."""
    out: list[tuple[str, list[str]]] = []
    steps = dict(dockerfile(DEPLOY / "Dockerfile"))
    assert yaml.safe_load(steps["ENTRYPOINT"]) == ["fedbus"]
    out.append(("Dockerfile CMD", yaml.safe_load(steps["CMD"])))
    for name, svc in compose()["services"].items():
        assert "entrypoint" not in svc, f"compose {name}: the image's entrypoint is fedbus"
        out.append((f"compose {name}", [str(a) for a in svc["command"]]))
    for name, spec in pod_specs():
        for c in spec.get("initContainers", []):
            assert c["command"][:2] == ["sh", "-c"], f"k8s {name}/{c['name']}"
        for c in spec["containers"]:
            assert "command" not in c, f"k8s {name}/{c['name']}: the image's entrypoint is fedbus"
            out.append((f"k8s {name}/{c['name']}", c["args"]))
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        out.append((f"systemd {unit.name}", systemd_argv(systemd_unit(unit), "site-1")))
    return out


def env_vars() -> list[tuple[str, str, str]]:
    """(where, NAME, value) for every FEDBUS_* variable set in deploy/."""
    out = []
    c = compose()
    for name, svc in c["services"].items():
        out += [(f"compose {name}", k, str(v)) for k, v in (svc.get("environment") or {}).items()]
    for name, spec in pod_specs():
        for cont in spec["containers"]:
            out += [(f"k8s {name}", e["name"], e["value"]) for e in cont.get("env", [])]
    out += [("systemd fedbus.env", k, v) for k, v in env_file(DEPLOY / "systemd" / "fedbus.env").items()]
    return [t for t in out if t[1].startswith("FEDBUS_")]


# --- tests --------------------------------------------------------------------------------------------------


def test_every_file_parses() -> None:
    seen = set()
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file() and "kits" not in p.parts):
        rel = path.relative_to(DEPLOY).as_posix()
        seen.add(rel)
        if path.suffix == ".yaml":
            assert yaml_docs(path), rel
        elif path.suffix == ".toml":
            tomllib.loads(path.read_text())
        elif path.suffix == ".service":
            assert systemd_unit(path)["Service"]["ExecStart"], rel
        elif path.suffix == ".env":
            assert env_file(path), rel
        elif path.suffix == ".sh":
            subprocess.run(["bash", "-n", str(path)], check=True)
        elif path.name == "Dockerfile":
            dockerfile(path)
        else:
            assert path.suffix in (".md", ".dockerignore"), f"deploy/{rel}: a file this test does not check"
    assert {"Dockerfile", "compose.yaml", "project.toml", "k8s/broker.yaml", "k8s/sites.yaml"} <= seen
    assert {"systemd/fedbus-broker.service", "systemd/fedbus-site@.service"} <= seen


def test_every_command_and_flag_exists_in_the_cli() -> None:
    commands = fedbus_commands()
    assert len(commands) >= 12
    for where, argv in commands:
        if argv == ["--help"]:
            continue
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `fedbus {shlex.join(argv)}` is refused by the CLI")
        assert isinstance(args, argparse.Namespace)


def test_every_environment_variable_exists_and_its_value_is_valid() -> None:
    cli_source = (ROOT / "fedbus" / "cli.py").read_text()
    known = {var for table in ENV_OVERRIDES.values() for var in table}
    known |= set(re.findall(r"environ\.get\(\"(FEDBUS_[A-Z_]+)\"", cli_source))
    found = env_vars()
    text = "".join(p.read_text() for p in DEPLOY.rglob("*") if p.is_file() and "kits" not in p.parts)
    assert {name for _, name, _ in found} <= set(re.findall(r"FEDBUS_[A-Z_]+", text))
    for name in sorted(set(re.findall(r"FEDBUS_[A-Z_]+", text))):
        assert name in known, f"deploy/ uses {name}, which fedbus does not read"
    broker_env = ENV_OVERRIDES["BrokerConfig"]
    for where, name, value in found:
        if name in broker_env and broker_env[name] not in ("secret_key", "participants"):
            load_config(BrokerConfig, None, environ={name: value})  # raises ConfigError naming the variable
        assert value, f"{where}: {name} is empty"


def test_ports_agree() -> None:
    project = tomllib.loads((DEPLOY / "project.toml").read_text())
    assert project["broker"].endswith(f":{BUS_PORT}") and project["bind"].endswith(f":{BUS_PORT}")
    steps = dockerfile(DEPLOY / "Dockerfile")
    assert {int(p) for w, a in steps if w == "EXPOSE" for p in a.split()} == {BUS_PORT, METRICS_PORT}

    broker = compose()["services"]["fedbus-broker"]
    assert int(flag(broker["command"], "--metrics-port")) == METRICS_PORT
    published = {int(p.rsplit(":", 1)[1]) for p in broker["ports"]}
    assert published == {BUS_PORT, METRICS_PORT}
    assert f":{METRICS_PORT}/healthz" in " ".join(broker["healthcheck"]["test"])

    (spec,) = [s for n, s in pod_specs() if n == "fedbus-broker"]
    (cont,) = spec["containers"]
    env = {e["name"]: e["value"] for e in cont["env"]}
    ports = {p["name"]: p["containerPort"] for p in cont["ports"]}
    assert ports == {"bus": BUS_PORT, "metrics": METRICS_PORT} and int(env["FEDBUS_METRICS_PORT"]) == METRICS_PORT
    assert cont["readinessProbe"]["httpGet"]["port"] in ("metrics", METRICS_PORT)
    (svc,) = [o for o in k8s_objects() if o["kind"] == "Service"]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        "bus": (BUS_PORT, "bus"),
        "metrics": (METRICS_PORT, "metrics"),
    }
    assert int(svc["metadata"]["annotations"]["prometheus.io/port"]) == METRICS_PORT
    assert int(env_file(DEPLOY / "systemd" / "fedbus.env")["FEDBUS_METRICS_PORT"]) == METRICS_PORT
    # the broker's selector matches its pods
    (dep,) = [o for o in k8s_objects() if o["kind"] == "Deployment" and o["metadata"]["name"] == "fedbus-broker"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_images_names_and_the_torch_pin_agree() -> None:
    c = compose()
    images = {svc["image"] for svc in c["services"].values()}
    images |= {cont["image"] for _, s in pod_specs() for cont in [*s["containers"], *s.get("initContainers", [])]}
    assert images == {IMAGE}
    project = tomllib.loads((DEPLOY / "project.toml").read_text())
    host = project["broker"].removeprefix("tcp://").rsplit(":", 1)[0]
    (svc,) = [o for o in k8s_objects() if o["kind"] == "Service"]
    assert host == svc["metadata"]["name"] and host in c["services"]
    sites = sorted(p["name"] for p in project["participant"] if p["role"] == "site")
    assert sites == sorted(n for n in c["services"] if n.startswith("site-"))
    assert sites == sorted(n.removeprefix("fedbus-") for n, _ in pod_specs() if n != "fedbus-broker")
    pin = re.search(r'"(torch==[0-9.]+)"', (ROOT / "scripts" / "setup.sh").read_text())
    assert pin and f"TORCH_SPEC={pin[1]}" in (DEPLOY / "Dockerfile").read_text()
    args = {a.split("=", 1)[0] for w, a in dockerfile(DEPLOY / "Dockerfile") if w == "ARG"}
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for svc in c["services"].values():
        build = svc["build"]["args"]
        assert set(build) <= args, f"compose passes build args the Dockerfile does not take: {set(build) - args}"
        wanted = build.get("EXTRAS", "").strip("[]")
        assert not wanted or set(wanted.split(",")) <= set(extras), wanted
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for word, arg in dockerfile(DEPLOY / "Dockerfile"):
        if word == "COPY":
            *sources, _ = arg.split()
            for src in sources:
                assert (ROOT / src).exists() and f"!{src.rstrip('/')}" in [i.rstrip("/") for i in ignore], src


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kits of deploy/project.toml, written by the real `fedbus provision`."""
    provision = pytest.importorskip("fedbus.provision", reason="fedbus provision is not in this tree yet")
    out = tmp_path_factory.mktemp("kits")
    provision.provision(DEPLOY / "project.toml", out)
    return out


def under(path: str, mounts: dict[str, Any]) -> tuple[Any, PurePosixPath]:
    """The mount holding ``path`` and the path relative to it."""
    p = PurePosixPath(path)
    for target, source in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if p == PurePosixPath(target) or PurePosixPath(target) in p.parents:
            return source, p.relative_to(target)
    raise AssertionError(f"{path} is on no mounted volume")


def test_compose_paths_exist(kits: Path) -> None:
    c = compose()
    for name, svc in c["services"].items():
        mounts = {}
        for v in svc["volumes"]:
            source, target, *_ = v.split(":")
            assert source in c["volumes"] or (DEPLOY / source).exists(), f"compose {name}: {source}"
            mounts[target] = source
        argv = [str(a) for a in svc["command"]]
        if argv[0] == "provision":
            assert under(argv[1], mounts)[0] == "./project.toml" and under(flag(argv, "-o"), mounts)[0] == "kits"
            continue
        for key in ("--config", "--workspace"):
            if key in argv:
                source, rel = under(flag(argv, key), mounts)
                assert source in c["volumes"], f"compose {name}: {key} must be on a named volume"
                if key == "--config":
                    assert source == "kits" and (kits / rel).is_file(), f"compose {name}: {rel} not in a kit"
                    assert load_config_kit(kits / rel)
        kit = (svc.get("environment") or {}).get("FEDBUS_KIT")
        if kit:
            source, rel = under(kit, mounts)
            assert source == "kits" and (kits / rel / "admin.toml").is_file()


def load_config_kit(path: Path) -> bool:
    """A kit's config file is complete: its key files exist beside it."""
    values = tomllib.loads(path.read_text())
    for key in ("secret_key", "broker_key", "participants"):
        if key in values:
            assert (path.parent / values[key]).is_file(), f"{path}: {key} = {values[key]!r} is missing"
    return True


def test_kubernetes_paths_and_secrets_exist(kits: Path) -> None:
    script = (DEPLOY / "k8s" / "secrets.sh").read_text()
    m = re.search(r"for kit in ([a-z0-9 -]+); do", script)
    assert m and '"fedbus-kit-$kit"' in script
    made = {f"fedbus-kit-{k}": k for k in m[1].split()}
    for name, spec in pod_specs():
        volumes = spec["volumes"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in volumes if "secret" in v}
        (secret_volume,) = secrets
        kit = kits / made[secrets[secret_volume]]
        assert kit.is_dir(), f"k8s {name}: secrets.sh makes {secrets[secret_volume]} from a kit provision lacks"
        (cont,) = spec["containers"]
        mounts = {m["mountPath"]: m["name"] for m in cont["volumeMounts"]}
        (init,) = spec["initContainers"]
        init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
        script_line = init["command"][2]
        assert f"{init_mounts[secret_volume]}/*" in script_line and list(kit.glob("*.key_secret"))
        copy = next(n for n, p in init_mounts.items() if n != secret_volume)
        vol, rel = under(flag(cont["args"], "--config"), mounts)
        assert vol == copy and (kit / rel).is_file() and load_config_kit(kit / rel)
        vol, _ = under(flag(cont["args"], "--workspace"), mounts)
        assert any(v["name"] == vol and ("persistentVolumeClaim" in v or "emptyDir" in v) for v in volumes)
        for e in cont.get("env", []):
            if e["value"].startswith("/"):
                vol, rel = under(e["value"], mounts)
                assert vol == secret_volume and (kit / rel).is_file(), f"k8s {name}: {e['name']}"
    claims = {o["metadata"]["name"] for o in k8s_objects() if o["kind"] == "PersistentVolumeClaim"}
    (broker,) = [s for n, s in pod_specs() if n == "fedbus-broker"]
    assert {
        v["persistentVolumeClaim"]["claimName"] for v in broker["volumes"] if "persistentVolumeClaim" in v
    } == claims
    kustomize = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kustomize["resources"]) == sorted(
        p.name for p in (DEPLOY / "k8s").glob("*.yaml") if p.stem != "kustomization"
    )


def test_systemd_paths_agree(kits: Path) -> None:
    for unit_path in sorted((DEPLOY / "systemd").glob("*.service")):
        unit = systemd_unit(unit_path)
        argv = systemd_argv(unit, "site-1")
        service = {k: v[-1].replace("%i", "site-1") for k, v in unit["Service"].items()}
        workspace = flag(argv, "--workspace")
        assert workspace == f"/var/lib/{service['StateDirectory']}" == service["ReadWritePaths"], unit_path.name
        config = PurePosixPath(flag(argv, "--config"))
        rel = config.relative_to("/etc/fedbus/kits")
        assert (kits / rel).is_file() and load_config_kit(kits / rel), f"{unit_path.name}: {config}"
        assert service["EnvironmentFile"].lstrip("-") == "/etc/fedbus/fedbus.env"
        assert service["RestartPreventExitStatus"] == "2"  # exit 2 is a usage error: the CLI's contract
        assert unit["Install"]["WantedBy"] == ["multi-user.target"]


# --- the real tools, where this machine has them ------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    fedbus = shutil.which("fedbus")
    if fedbus is None:
        pytest.skip("the fedbus command is not installed (pip install -e .)")
    units = []
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        name = unit.name.replace("@.", "@site-1.")  # a template is verified as one instance
        target = tmp_path / name
        target.write_text(unit.read_text().replace("/opt/fedbus/bin/fedbus", fedbus))
        units.append(str(target))
    res = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr  # an unknown key is only a warning


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_manifests() -> None:
    res = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stderr
    objects = [d for d in yaml.safe_load_all(res.stdout) if d]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["Namespace", "Service", "PersistentVolumeClaim", *["Deployment"] * 4])
    assert all(o["metadata"].get("namespace") == "fedbus" for o in objects if o["kind"] != "Namespace")


# --- the compose federation's own commands, as local processes ------------------------------------------------


def host_argv(argv: list[str], volumes: dict[str, Path]) -> list[str]:
    """A container's argv with its mounted paths moved to host folders."""
    out = []
    for a in argv:
        for target, host in volumes.items():
            if a == target or a.startswith(target + "/"):
                a = str(host) + a[len(target) :]
        out.append(a)
    return out


@pytest.mark.timeout(90)
def test_compose_commands_run_a_federation_as_processes(kits: Path, tmp_path: Path) -> None:
    """The broker's and a site's commands of compose.yaml, with their kits, CurveZMQ and the metrics port, and
    the admin's kit: only the paths become host folders and the ports free ones (flags beat the kits)."""
    from tests.broker.test_metrics import free_port
    from tests.e2e.procs import FEDBUS, Daemon

    c = compose()
    volumes = {"/kits": kits, "/var/lib/fedbus/broker": tmp_path / "broker"}
    argv = host_argv([str(a) for a in c["services"]["fedbus-broker"]["command"]], volumes)
    port = free_port()
    argv[argv.index("--metrics-port") + 1] = str(port)
    daemons = [Daemon([*argv, "--bind", "tcp://127.0.0.1:0"], tmp_path / "broker.log")]
    try:
        address = daemons[0].wait_for("broker listening")["address"]
        sites = sorted(n for n in c["services"] if n.startswith("site-"))[:1]  # the others differ by name only
        for name in sites:
            volumes["/var/lib/fedbus/site"] = tmp_path / name
            argv = host_argv([str(a) for a in c["services"][name]["command"]], volumes)
            daemons.append(Daemon([*argv, "--broker", address], tmp_path / f"{name}.log"))
        for d in daemons[1:]:
            d.wait_for("welcomed by the broker")
        kit = host_argv([c["services"]["admin"]["environment"]["FEDBUS_KIT"]], volumes)[0]
        res = subprocess.run(
            [*FEDBUS, "status", "--json", "--broker", address, "--timeout", "20"],
            env={**os.environ, "FEDBUS_KIT": kit},
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert res.returncode == 0, res.stderr
        assert sorted(s["name"] for s in json.loads(res.stdout)["sites"] if s["online"]) == sites
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert f"fedbus_sites_connected {len(sites)}" in resp.read().decode()
    finally:
        codes = [d.stop() for d in reversed(daemons)]
    assert codes == [0] * len(daemons)
