"""The broker profiles in brokers/: each loads and validates, local.toml documents every key, and in every
profile a mistyped key or a wrong value is refused with the key's name and the file's path."""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from fedbus.cli import build_parser
from fedbus.config import BrokerConfig, load_config
from fedbus.errors import ConfigError

BROKERS = Path(__file__).resolve().parents[1] / "brokers"
PROFILES = sorted(p.name for p in BROKERS.glob("*.toml"))
KEY_LINE = re.compile(r"^([a-z_]+)\s*=", re.MULTILINE)


def test_the_documented_profiles_exist() -> None:
    assert {"local.toml", "poc.toml"} <= set(PROFILES)


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_loads_and_every_key_is_a_config_key(profile: str) -> None:
    path = BROKERS / profile
    cfg = load_config(BrokerConfig, path, {}, environ={})
    keys = tomllib.loads(path.read_text())
    assert keys and set(keys) <= {f.name for f in fields(BrokerConfig)}
    for key, value in keys.items():
        if key not in ("secret_key", "participants"):  # paths are resolved against the file's folder
            assert getattr(cfg, key) == value, key


def test_local_profile_documents_every_key() -> None:
    text = (BROKERS / "local.toml").read_text()
    documented = set(re.findall(r"^#?\s*([a-z_]+)\s*=", text, re.MULTILINE))
    missing = {f.name for f in fields(BrokerConfig)} - documented
    assert not missing, f"brokers/local.toml does not document {sorted(missing)}"


@pytest.mark.parametrize("profile", PROFILES)
def test_a_mistyped_key_is_refused_naming_it_and_the_file(profile: str, tmp_path: Path) -> None:
    text = (BROKERS / profile).read_text()
    keys = KEY_LINE.findall(text)
    assert keys
    for key in keys:
        path = tmp_path / profile
        typo = key[:-1] if len(key) > 4 else key + "s"
        path.write_text(re.sub(rf"^{key}(\s*=)", rf"{typo}\1", text, count=1, flags=re.MULTILINE))
        with pytest.raises(ConfigError) as e:
            load_config(BrokerConfig, path, {}, environ={})
        assert str(e.value).startswith(f"{path}: unknown key {typo!r}"), str(e.value)
        assert f"did you mean {key!r}" in str(e.value)


@pytest.mark.parametrize("profile", PROFILES)
def test_a_wrong_value_type_is_refused_naming_the_key_and_the_file(profile: str, tmp_path: Path) -> None:
    text = (BROKERS / profile).read_text()
    for key in KEY_LINE.findall(text):
        path = tmp_path / profile
        path.write_text(re.sub(rf"^{key}\s*=.*$", f"{key} = [1, 2]", text, count=1, flags=re.MULTILINE))
        with pytest.raises(ConfigError) as e:
            load_config(BrokerConfig, path, {}, environ={})
        assert str(e.value).startswith(f"{path}: key {key!r} must be"), str(e.value)


@pytest.mark.parametrize("profile", PROFILES)
def test_the_commands_in_a_profile_header_parse(profile: str) -> None:
    """Each profile says how to start it (`#   fedbus broker --config brokers/NAME.toml ...`): that works."""
    header = "\n".join((BROKERS / profile).read_text().splitlines()[:6])
    commands = re.findall(r"^#\s+fedbus (broker --.*)$", header, re.MULTILINE)
    assert commands, f"{profile}: no start command in the header"
    for line in commands:
        args = build_parser().parse_args(shlex.split(re.sub(r"\[[^\]]*\]", "", line)))  # [optional] parts dropped
        assert args.command == "broker" and args.config == f"brokers/{profile}"


def test_metrics_keys_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    for line, match in (
        ("metrics_port = 70000", "key 'metrics_port' must be a TCP port"),
        ('metrics_port = "9100"', "key 'metrics_port' must be an integer"),
        ('metrics_host = "http://0.0.0.0"', "key 'metrics_host' must be a host name"),
    ):
        path.write_text(line + "\n")
        with pytest.raises(ConfigError, match=match):
            load_config(BrokerConfig, path, {}, environ={})
    with pytest.raises(ConfigError, match=r"^\$FEDBUS_METRICS_PORT: key 'metrics_port' must be an integer"):
        load_config(BrokerConfig, None, {}, environ={"FEDBUS_METRICS_PORT": "ninety"})
    cfg = load_config(BrokerConfig, None, {}, environ={"FEDBUS_METRICS_PORT": "9100"})
    assert (cfg.metrics_port, cfg.metrics_host) == (9100, "127.0.0.1")


async def test_upload_slots_follow_the_cores_unless_the_profile_says(monkeypatch, tmp_path: Path) -> None:
    from fedbus.broker import server, uploads

    def slots_of(config: BrokerConfig) -> int:
        broker = server.Broker(config)  # not started: what it would receive uploads with
        try:
            return broker.uploads.slots.slots
        finally:
            broker.guard.close()
            broker._release_ctx()
            broker.store.close()

    for cores, slots in ((2, 2), (4, 2), (8, 4), (16, 4)):
        monkeypatch.setattr(uploads, "usable_cores", lambda cores=cores: cores)
        assert uploads.default_upload_slots() == slots
        assert slots_of(BrokerConfig(workspace=str(tmp_path / f"w{cores}"))) == slots
    assert slots_of(BrokerConfig(workspace=str(tmp_path / "w"), upload_slots=3)) == 3  # a profile's value wins
