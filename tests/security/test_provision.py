"""``fedbus provision``: kits, permissions, re-runs that keep keys, revocation marks; kits that load."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from fedbus import cli
from fedbus.config import AdminConfig, BrokerConfig, SiteConfig, load_config
from fedbus.errors import ConfigError
from fedbus.provision import provision
from fedbus.security import ClientKeys, Participants
from fedbus.transport.curve import load_public_key
from tests.security.helpers import PROJECT, make_kits


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_kits_layout_permissions_and_configs(tmp_path: Path) -> None:
    kits = make_kits(tmp_path)
    assert sorted(p.name for p in (kits / "broker").iterdir()) == [
        "README.txt", "broker.key", "broker.key_secret", "broker.toml", "participants.toml",
    ]  # fmt: skip
    assert sorted(p.name for p in (kits / "site-1").iterdir()) == [
        "README.txt", "broker.key", "site-1.key", "site-1.key_secret", "site.toml",
    ]  # fmt: skip
    assert (kits / "ops" / "admin.toml").exists() and (kits / "ops" / "ops.key_secret").exists()
    for kit in ("broker", "site-1", "site-2", "ops"):
        assert _mode(kits / kit) == 0o700
        assert _mode(next((kits / kit).glob("*.key_secret"))) == 0o600
    assert "fedbus site --config site-1/site.toml" in (kits / "site-1" / "README.txt").read_text()

    # the kits are relocatable: configs name files relative to their own folder
    moved = tmp_path / "elsewhere"
    shutil.copytree(kits, moved)
    site = load_config(SiteConfig, moved / "site-1" / "site.toml", environ={})
    assert site.name == "site-1" and site.broker == "tcp://127.0.0.1:7788"
    assert site.secret_key == str(moved / "site-1" / "site-1.key_secret")
    k = ClientKeys.load(site.secret_key, site.broker_key)  # type: ignore[arg-type]
    assert k.server == load_public_key(moved / "broker" / "broker.key")
    broker = load_config(BrokerConfig, moved / "broker" / "broker.toml", environ={})
    assert broker.bind == "tcp://0.0.0.0:7788" and broker.participants == str(moved / "broker" / "participants.toml")
    admin = load_config(AdminConfig, moved / "ops" / "admin.toml", environ={})
    assert admin.name == "ops" and admin.broker_key == str(moved / "ops" / "broker.key")
    # environment overrides, as the deploy files use them
    env = {"FEDBUS_SECRET_KEY": "/run/secrets/k", "FEDBUS_PARTICIPANTS": "/etc/p.toml"}
    broker = load_config(BrokerConfig, moved / "broker" / "broker.toml", environ=env)
    assert (broker.secret_key, broker.participants) == ("/run/secrets/k", "/etc/p.toml")

    people = Participants(kits / "broker" / "participants.toml")
    assert {p.name: p.role for p in people.by_name.values()} == {"site-1": "site", "site-2": "site", "ops": "admin"}


def test_rerun_keeps_keys_adds_participants_and_marks_revoked(tmp_path: Path) -> None:
    kits = make_kits(tmp_path)
    before = {n: (kits / n / f"{n}.key").read_bytes() for n in ("site-1", "site-2", "ops")}
    broker_key = (kits / "broker" / "broker.key").read_bytes()
    project = tmp_path / "project.toml"
    project.write_text(
        PROJECT.format(revoked='revoked = ["site-2"]') + '\n[[participant]]\nname = "site-3"\nrole = "site"\n'
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["provision", str(project), "-o", str(kits)]) == 0
    summary = json.loads(out.getvalue())
    assert summary["created"] == ["site-3"] and summary["revoked"] == ["site-2"]
    assert {n: (kits / n / f"{n}.key").read_bytes() for n in before} == before
    assert (kits / "broker" / "broker.key").read_bytes() == broker_key
    assert (kits / "site-3" / "broker.key").read_bytes() == broker_key
    people = Participants(kits / "broker" / "participants.toml")
    assert people.allowed("site-2") is None and people.by_name["site-2"].revoked
    assert people.allowed("site-3", "site") is not None and people.allowed("ops", "site") is None


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('name = "p"\nbroker = "tcp://h:1"\n', "participant"),
        ('name = "p"\nbroker = "h:1"\n[[participant]]\nname = "a"\nrole = "site"\n', "broker"),
        ('name = "p"\nbroker = "tcp://h:1"\n[[participant]]\nname = "a/b"\nrole = "site"\n', "safe name"),
        ('name = "p"\nbroker = "tcp://h:1"\n[[participant]]\nname = "a"\nrole = "root"\n', "role"),
        ('name = "p"\nbroker = "tcp://h:1"\n[[participant]]\nname = "broker"\nrole = "site"\n', "safe name"),
        ('name = "p"\nbroker = "tcp://h:1"\nrevoked = ["zz"]\n[[participant]]\nname = "a"\nrole = "site"\n', "zz"),
        ('name = "p"\nbroker = "tcp://h:1"\nsites = 3\n[[participant]]\nname = "a"\nrole = "site"\n', "unknown"),
    ],
)
def test_bad_project_files_are_refused_with_a_clear_error(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        provision(tmp_path / "p.toml", tmp_path / "out")


def test_a_participant_cannot_change_role(tmp_path: Path) -> None:
    make_kits(tmp_path)
    (tmp_path / "p.toml").write_text(
        'name = "secure-test"\nbroker = "tcp://h:1"\n[[participant]]\nname = "ops"\nrole = "site"\n'
    )
    with pytest.raises(ConfigError, match="was provisioned as admin"):
        provision(tmp_path / "p.toml", tmp_path / "kits")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_local_link_is_not_reachable_by_another_user(tmp_path: Path) -> None:
    """The site's link to its script: ipc, mode 0600, in a 0700 job folder: another user cannot connect."""
    import socket
    import warnings

    import zmq.asyncio

    from fedbus.site.folder import JobFolder

    folder = JobFolder(tmp_path / "jobs" / "j1")
    folder.prepare()
    ctx = zmq.asyncio.Context()
    link = folder.bind_link(ctx)
    path = link.address.removeprefix("ipc://")
    try:
        with warnings.catch_warnings():  # 3.12+ warns about fork in a threaded process: the child only connects
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: become nobody, try to connect, report by exit code (2: refused)
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
                code = 0
            except PermissionError:
                code = 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 2
        assert _mode(Path(path)) == 0o600 and _mode(folder.root) == 0o700
    finally:
        link.close()
        folder.remove_link()
        ctx.destroy(linger=0)
