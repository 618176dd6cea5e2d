"""HE keys as ``fedbus provision`` writes them and as the daemons check them: one secret context for the sites,
the broker's part without any key; the broker refuses a secret in reach, a site a context that is not private."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedbus.broker.launcher import JobLauncher
from fedbus.config import BrokerConfig, SiteConfig, load_config
from fedbus.errors import ConfigError, JobError
from fedbus.he.context import from_bytes, load_broker_context, load_site_context
from fedbus.jobs import parse_job_toml
from fedbus.provision import provision
from fedbus.site.filters import HEEncrypt, he_filter
from fedbus.strategy.encrypted import EncryptedFedBuff
from tests.privacy.helpers import ts  # noqa: F401  (skips without TenSEAL)

pytestmark = pytest.mark.timeout(60)

PROJECT = """
name = "he-keys"
broker = "tcp://127.0.0.1:7788"
{he}
[[participant]]
name = "a"
role = "site"

[[participant]]
name = "b"
role = "site"

[[participant]]
name = "ops"
role = "admin"
"""


def make(tmp: Path, he: str = "he = true") -> Path:
    (tmp / "project.toml").write_text(PROJECT.format(he=he))
    provision(tmp / "project.toml", tmp / "kits")
    return tmp / "kits"


def test_provision_gives_the_sites_one_secret_context_and_the_broker_none(tmp_path: Path) -> None:
    kits = make(tmp_path)
    secrets = [(kits / s / "he_context.secret") for s in ("a", "b")]
    assert all(os.stat(p).st_mode & 0o777 == 0o600 for p in secrets)
    assert secrets[0].read_bytes() == secrets[1].read_bytes()  # one context for the project
    assert load_site_context(secrets[0]).has_secret_key()
    broker = kits / "broker" / "he_context.public"
    assert not from_bytes(broker.read_bytes(), "b").has_secret_key()
    assert [p.name for p in (kits / "broker").iterdir() if p.name.startswith("he_")] == ["he_context.public"]
    assert not list((kits / "ops").glob("he_*"))
    # the kits' configs name them, relative to the kit
    assert load_config(BrokerConfig, kits / "broker" / "broker.toml").he_context == str(broker.resolve())
    assert load_config(SiteConfig, kits / "a" / "site.toml").he_context == str(secrets[0].resolve())
    load_broker_context(broker)
    # provisioning again keeps the context: kits handed out stay valid
    before = secrets[0].read_bytes()
    provision(tmp_path / "project.toml", kits)
    assert secrets[0].read_bytes() == before and (kits / "he_context.secret").read_bytes() == before


def test_a_project_without_he_provisions_no_context(tmp_path: Path) -> None:
    kits = make(tmp_path, he="")
    assert not list(kits.rglob("he_context*"))
    assert "he_context" not in (kits / "a" / "site.toml").read_text()


def test_bad_he_parameters_are_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="project.toml: he poly_modulus_degree"):
        make(tmp_path, he="[he]\npoly_modulus_degree = 1000")


def test_the_broker_refuses_a_context_with_a_secret_key_or_one_beside_it(tmp_path: Path) -> None:
    kits = make(tmp_path)
    secret = kits / "a" / "he_context.secret"
    folder = tmp_path / "leaky"
    folder.mkdir()
    shutil.copy(secret, folder / "he_context.public")  # the secret context under the broker's file name
    with pytest.raises(ConfigError, match="holds the secret key"):
        load_broker_context(folder / "he_context.public")
    shutil.copy(secret, kits / "broker" / "he_context.secret")  # a secret context left in the broker's folder
    with pytest.raises(ConfigError, match="holds a secret HE context"):
        load_broker_context(kits / "broker" / "he_context.public")
    # and an HE job does not start on that broker: the launcher's strategy for it fails with the reason
    spec = {
        "strategy": "fedavg",
        "strategy_args": {"min_clients": 1, "num_rounds": 1},
        "extra": {"privacy": {"he": True}},
    }
    fake = SimpleNamespace(config=BrokerConfig(he_context=str(kits / "broker" / "he_context.public")))
    with pytest.raises(ConfigError, match="secret HE context"):
        JobLauncher._strategy(fake, spec)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no he_context"):
        JobLauncher._strategy(SimpleNamespace(config=BrokerConfig()), spec)  # type: ignore[arg-type]
    (kits / "broker" / "he_context.secret").unlink()
    spec = {**spec, "strategy": "fedbuff", "strategy_args": {"concurrency": 1, "buffer_size": 1, "num_versions": 1}}
    assert isinstance(JobLauncher._strategy(fake, spec), EncryptedFedBuff)  # type: ignore[arg-type]


def test_a_site_context_must_be_private_and_hold_the_secret_key(tmp_path: Path) -> None:
    kits = make(tmp_path)
    secret = kits / "a" / "he_context.secret"
    os.chmod(secret, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_site_context(secret)
    public = kits / "broker" / "he_context.public"
    os.chmod(public, 0o600)
    with pytest.raises(ConfigError, match="holds no secret key"):
        load_site_context(public)
    os.chmod(secret, 0o600)
    extra = {"privacy": {"he": True, "he_plaintext": ["bn.*"]}}
    assert isinstance(he_filter(extra, str(secret)), HEEncrypt)
    assert he_filter({"privacy": {"dp_clip": 1.0}}, None) is None
    with pytest.raises(JobError, match="no he_context"):
        he_filter(extra, None)


JOB = """
name = "j"
model = "m.safetensors"
[strategy]
{strategy}
[script]
path = "c.py"
{more}
[extra.privacy]
he = true
"""


@pytest.mark.parametrize(
    ("strategy", "more", "why"),
    [
        ('name = "scaffold"\nmin_clients = 1\nnum_rounds = 1', "", "averages with public weights"),
        ('name = "fedavg"\nmin_clients = 1\nnum_rounds = 1', "[cross_site_eval]\nenabled = true", "cross_site_eval"),
        ('name = "fedbuff"\nconcurrency = 1\nbuffer_size = 1\nnum_versions = 1\nserver_momentum = 0.9', "", "momentum"),
    ],
)
def test_submit_refuses_an_he_job_its_strategy_cannot_run(strategy: str, more: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_job_toml(JOB.format(strategy=strategy, more=more), "job.toml")
    ok = JOB.format(strategy='name = "fedavg"\nmin_clients = 1\nnum_rounds = 1', more="")
    assert parse_job_toml(ok, "job.toml").extra["privacy"]["he"] is True


def test_the_daemons_check_their_he_context_at_start(tmp_path: Path) -> None:
    from fedbus.broker import Broker
    from fedbus.site import Site

    kits = make(tmp_path)
    secret = kits / "a" / "he_context.secret"
    shutil.copy(secret, kits / "broker" / "he_context.secret")
    cfg = BrokerConfig(workspace=str(tmp_path / "ws"), he_context=str(kits / "broker" / "he_context.public"))
    with pytest.raises(ConfigError, match="secret HE context"):
        Broker(cfg)
    os.chmod(secret, 0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        Site(SiteConfig(name="a", workspace=str(tmp_path / "a"), he_context=str(secret)))
