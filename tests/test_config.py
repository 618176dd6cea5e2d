"""Daemon configs: the shipped profiles load, every refusal names the file, the key and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedbus.broker import Broker
from fedbus.config import BrokerConfig, SiteConfig, is_safe_name, load_config
from fedbus.errors import ConfigError

BROKERS = Path(__file__).resolve().parents[1] / "brokers"


def write(tmp_path: Path, text: str, name: str = "x.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("profile", sorted(p.name for p in BROKERS.glob("*.toml")))
def test_shipped_profiles_load(profile: str) -> None:
    cfg = load_config(BrokerConfig, BROKERS / profile, {}, environ={})
    assert isinstance(cfg, BrokerConfig)


def test_local_profile_is_the_defaults_written_out() -> None:
    assert load_config(BrokerConfig, BROKERS / "local.toml", {}, environ={}) == BrokerConfig()


def test_poc_profile_has_short_heartbeats() -> None:
    cfg = load_config(BrokerConfig, BROKERS / "poc.toml", {}, environ={})
    assert (cfg.heartbeat_s, cfg.liveness) == (0.5, 4)


def test_no_file_gives_defaults_and_byte_sizes() -> None:
    cfg = load_config(BrokerConfig, None, {}, environ={})
    assert cfg == BrokerConfig()
    assert (cfg.chunk_bytes, cfg.window_bytes) == (2 << 20, None)  # None: the broker's, by its upload slots


@pytest.mark.parametrize(
    ("slots", "window_mb", "expected_mb"), [(2, None, 32), (4, None, 16), (64, None, 2), (4, 8, 8)]
)
async def test_the_uploads_share_64_mib_of_windows_unless_the_profile_sets_one(
    tmp_path: Path, slots: int, window_mb: float | None, expected_mb: int
) -> None:
    cfg = BrokerConfig(
        bind=f"ipc://{tmp_path}/b.sock", workspace=str(tmp_path / "b"), upload_slots=slots, window_mb=window_mb
    )
    async with Broker(cfg) as broker:
        assert broker.hub is not None and broker.hub.window == expected_mb << 20  # never under a chunk (2 MiB)


def test_unknown_key_names_file_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, "heartbeat = 2.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(BrokerConfig, path, {}, environ={})
    assert str(e.value) == f"{path}: unknown key 'heartbeat' (did you mean 'heartbeat_s'?)"


def test_tables_are_refused_with_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "[broker]\nbind = 'tcp://127.0.0.1:1'\n")
    with pytest.raises(ConfigError, match="unknown key 'broker'.*top level"):
        load_config(BrokerConfig, path, {}, environ={})


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("liveness = 5.0", "'liveness' must be an integer"),
        ("liveness = true", "'liveness' must be an integer"),
        ("heartbeat_s = '1'", "'heartbeat_s' must be a number"),
        ("heartbeat_s = nan", "'heartbeat_s' must be a number"),
        ("heartbeat_s = inf", "'heartbeat_s' must be a number"),
        ("log_json = 1", "'log_json' must be a boolean"),
        ("bind = 7788", "'bind' must be a string"),
        ("round_timeout_s = 'never'", "'round_timeout_s' must be a number"),
    ],
)
def test_types_checked(tmp_path: Path, line: str, match: str) -> None:
    path = write(tmp_path, line + "\n")
    with pytest.raises(ConfigError, match=match) as e:
        load_config(BrokerConfig, path, {}, environ={})
    assert str(e.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("heartbeat_s = 0", "'heartbeat_s' must be > 0"),
        ("liveness = 0", "'liveness' must be >= 1"),
        ("chunk_mb = 0.03125", r"'chunk_mb' must be within \[0.0625, 64\]"),
        ("chunk_mb = 128", r"'chunk_mb' must be within"),
        ("chunk_mb = 0.1", "'chunk_mb' must be a multiple of 1/1024"),
        ("window_mb = 1", r"window_mb \(1\) must be >= chunk_mb \(2\)"),
        ("upload_slots = 0", "'upload_slots' must be >= 1"),
        ("keep_versions = -1", "'keep_versions' must be >= 0"),
        ("round_timeout_s = 0", "'round_timeout_s' must be > 0"),
        ("bind = 'http://x'", "'bind' must be a ZeroMQ address"),
        ("bind = 'tcp://'", "'bind' must be a ZeroMQ address"),
        ("log_level = 'loud'", "'log_level' must be one of"),
        ("workspace = ' '", "'workspace' must not be empty"),
    ],
)
def test_values_checked(tmp_path: Path, line: str, match: str) -> None:
    path = write(tmp_path, line + "\n")
    with pytest.raises(ConfigError, match=match) as e:
        load_config(BrokerConfig, path, {}, environ={})
    assert str(path) in str(e.value)


def test_int_accepted_for_float_and_kib_chunks(tmp_path: Path) -> None:
    path = write(tmp_path, "heartbeat_s = 2\nchunk_mb = 0.0625\nwindow_mb = 0.5\nlog_level = 'DEBUG'\n")
    cfg = load_config(BrokerConfig, path, {}, environ={})
    assert cfg.heartbeat_s == 2.0 and isinstance(cfg.heartbeat_s, float)
    assert cfg.chunk_bytes == 64 * 1024
    assert cfg.log_level == "debug"


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "bind = \n")
    with pytest.raises(ConfigError, match=f"^{path}: invalid TOML: "):
        load_config(BrokerConfig, path, {}, environ={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(BrokerConfig, tmp_path / "nope.toml", {}, environ={})


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "bind = 'tcp://127.0.0.1:1'\nliveness = 3\n")
    env = {"FEDBUS_BIND": "ipc:///tmp/fedbus.sock"}
    assert load_config(BrokerConfig, path, {}, environ={}).bind == "tcp://127.0.0.1:1"
    assert load_config(BrokerConfig, path, {}, environ=env).bind == "ipc:///tmp/fedbus.sock"
    cfg = load_config(BrokerConfig, path, {"bind": "inproc://b", "liveness": None}, environ=env)
    assert (cfg.bind, cfg.liveness) == ("inproc://b", 3)  # None = flag not given


def test_env_override_is_validated_and_named() -> None:
    with pytest.raises(ConfigError, match=r"^\$FEDBUS_BROKER: key 'broker' must be a ZeroMQ address"):
        load_config(SiteConfig, None, {"name": "s1"}, environ={"FEDBUS_BROKER": "localhost:7788"})


def test_env_read_from_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDBUS_BROKER", "tcp://10.0.0.1:7788")
    monkeypatch.setenv("FEDBUS_BIND", "tcp://0.0.0.0:9")
    assert load_config(SiteConfig, None, {"name": "s1"}).broker == "tcp://10.0.0.1:7788"
    assert load_config(BrokerConfig, None, {}).bind == "tcp://0.0.0.0:9"


def test_env_of_the_other_daemon_is_ignored() -> None:
    cfg = load_config(SiteConfig, None, {"name": "s1"}, environ={"FEDBUS_BIND": "not an address"})
    assert cfg.broker == "tcp://127.0.0.1:7788"


def test_flags_are_validated_like_the_file() -> None:
    with pytest.raises(ConfigError, match="^command line: unknown key 'hartbeat_s' .did you mean 'heartbeat_s'"):
        load_config(BrokerConfig, None, {"hartbeat_s": 1.0}, environ={})
    with pytest.raises(ConfigError, match="^command line: key 'liveness' must be an integer"):
        load_config(BrokerConfig, None, {"liveness": "5"}, environ={})


def test_site_config(tmp_path: Path) -> None:
    path = write(tmp_path, "name = 'hospital-a'\nbroker = 'tcp://10.0.0.1:7788'\ntask_timeout_s = 600\n")
    cfg = load_config(SiteConfig, path, {"workspace": "/tmp/s1"}, environ={})
    assert (cfg.name, cfg.broker, cfg.task_timeout_s, cfg.workspace) == (
        "hospital-a",
        "tcp://10.0.0.1:7788",
        600.0,
        "/tmp/s1",
    )


def test_site_name_required_and_safe(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing required key 'name'"):
        load_config(SiteConfig, write(tmp_path, "workspace = '/tmp/s'\n"), {}, environ={})
    for bad in ["a/b", "", "..", "x" * 65, "sïte", "a b"]:
        with pytest.raises(ConfigError, match="'name' must be 1-64 characters"):
            load_config(SiteConfig, None, {"name": bad}, environ={})


def test_broker_keys_are_not_site_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'bind'"):
        load_config(SiteConfig, write(tmp_path, "name = 's'\nbind = 'tcp://127.0.0.1:1'\n"), {}, environ={})


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ConfigError, match="BrokerConfig: key 'liveness' must be >= 1"):
        BrokerConfig(liveness=0)
    with pytest.raises(ConfigError, match="SiteConfig: key 'name'"):
        SiteConfig(name="../etc")


def test_is_safe_name() -> None:
    assert is_safe_name("site-1") and is_safe_name("a.b_c-D9")
    assert not any(is_safe_name(x) for x in ["", ".", "..", "a/b", "a\\b", "x" * 65, None, 3])
