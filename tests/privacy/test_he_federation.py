"""Homomorphic encryption on a real federation: an in-process broker and site daemons over tcp loopback, their
training scripts real child processes, the keys from ``fedbus provision``.

What must hold, checked on the bytes: a site's plaintext update never reaches the broker. Each site's script
sends a known update (a seeded random tensor); runs of 16 of its float32 values are searched for in every byte
the broker received (a relay in front of it records the connection of one site: no CURVE, so what crosses it
is what the broker's endpoint reads), in every file of the broker's workspace after the job (spool files,
checkpoints, database, audit log) and in what the broker's fold held after each update. The decrypted final
model is the weighted FedAvg of the updates within CKKS precision, and the script saw the global model in
plaintext. A site without the project's HE context refuses the job with a clear reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fedbus.admin import Admin
from fedbus.broker import Broker
from fedbus.config import BrokerConfig, SiteConfig
from fedbus.he.codec import decrypt_params
from fedbus.he.context import load_site_context
from fedbus.he.fold import CipherFold
from fedbus.modelio import serde
from fedbus.provision import provision
from fedbus.site import Site
from tests.broker.harness import wait_job
from tests.privacy.helpers import found, windows
from tests.security.helpers import Relay, until

pytestmark = pytest.mark.timeout(90)
N = 5000  # two ciphertexts a tensor at 4096 slots
ATOL = 1e-4

PROJECT = """
name = "he-test"
broker = "tcp://127.0.0.1:7788"
he = true

[[participant]]
name = "site-1"
role = "site"

[[participant]]
name = "site-2"
role = "site"
"""

SCRIPT = """
import torch
import fedbus.client as flare

flare.init()
index = int(flare.get_site_name().rsplit("-", 1)[1])
while flare.is_running():
    model = flare.receive()
    r = model.current_round
    torch.save(model.params, f"received-{r}.pt")  # what the script was handed: plaintext
    g = torch.Generator().manual_seed(1000 * index + r)
    params = {"w": torch.randn(model.params["w"].numel(), generator=g), "bn.mean": model.params["bn.mean"] + index}
    flare.send(flare.FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": index}))
"""


def sent(index: int, r: int) -> torch.Tensor:
    """The "w" site ``index`` sends in round ``r`` (as its script computes it)."""
    return torch.randn(N, generator=torch.Generator().manual_seed(1000 * index + r))


def write_job(folder: Path, rounds: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "client.py").write_text(SCRIPT)
    serde.write_file(folder / "model.safetensors", serde.layout({"w": torch.zeros(N), "bn.mean": torch.zeros(4)}))
    (folder / "job.toml").write_text(
        'name = "he"\nmodel = "model.safetensors"\n\n'
        f'[strategy]\nname = "fedavg"\nmin_clients = 2\nnum_rounds = {rounds}\n\n'
        '[script]\npath = "client.py"\n\n[sites]\nmin = 2\nmax = 2\n\n'
        '[extra.privacy]\nhe = true\nhe_plaintext = ["bn.*"]\n'
    )
    return folder


def kits(tmp: Path) -> Path:
    (tmp / "project.toml").write_text(PROJECT)
    provision(tmp / "project.toml", tmp / "kits")
    return tmp / "kits"


def broker_config(tmp: Path, kit: Path) -> BrokerConfig:
    return BrokerConfig(
        bind="tcp://127.0.0.1:0",
        workspace=str(tmp / "broker"),
        heartbeat_s=0.2,
        liveness=10,
        he_context=str(kit / "broker" / "he_context.public"),
    )


def site(tmp: Path, name: str, address: str, context: Path | None) -> Site:
    cfg = SiteConfig(
        name=name,
        broker=address,
        workspace=str(tmp / name),
        heartbeat_s=0.2,
        he_context=None if context is None else str(context),
    )
    return Site(cfg)


async def test_the_broker_never_sees_a_plaintext_update_and_the_sites_get_the_fedavg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    kit = kits(tmp_path)
    assert [p.name for p in (kit / "broker").glob("he_context*")] == ["he_context.public"]
    held: list[bytes] = []
    add = CipherFold.add

    def recording_add(self: CipherFold, params, coef):  # type: ignore[no-untyped-def]
        add(self, params, coef)
        held.append(b"".join(self.held()))  # the fold's memory after each update

    monkeypatch.setattr(CipherFold, "add", recording_add)
    rounds = 2
    async with Broker(broker_config(tmp_path, kit)) as broker, Relay(broker.address) as relay:
        one = site(tmp_path, "site-1", relay.address, kit / "site-1" / "he_context.secret")
        two = site(tmp_path, "site-2", broker.address, kit / "site-2" / "he_context.secret")
        async with one, two:
            await until(lambda: broker.registry.online() == ["site-1", "site-2"], what="both sites online")
            async with Admin(broker.address) as admin:
                job_id = await admin.submit(write_job(tmp_path / "job", rounds))
                state = await wait_job(admin, job_id, timeout=80.0)
                assert state["state"] == "finished", state

    updates = [sent(i, r) for i in (1, 2) for r in range(rounds)]
    patterns = [p for u in updates for p in windows(u)]
    # control: the search finds a plaintext update in the bytes a plaintext upload would carry
    assert found(windows(updates[0]), serde.layout({"w": updates[0]}).header + updates[0].numpy().tobytes())

    # the wire: site-1's connection to the broker carried its updates (ciphertexts: many times their size)
    assert len(relay.captured) > rounds * updates[0].numel() * 4 * 4
    assert not found(patterns, relay.captured)
    # the fold's memory after every update it took
    assert len(held) == 2 * rounds and all(held)
    assert not any(found(patterns, h) for h in held)
    # every file of the broker's workspace
    files = [p for p in (tmp_path / "broker").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:
        assert not found(patterns, path.read_bytes()), path

    # the final global model, a ciphertext at the broker, decrypts to the weighted FedAvg (weights 1 and 2)
    ctx = load_site_context(kit / "site-1" / "he_context.secret")
    checkpoints = sorted((tmp_path / "broker").rglob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    final = serde.read_file(checkpoints[-1])
    assert final["w"].dtype == torch.uint8
    plain = decrypt_params(ctx, final)
    expected = (1 * sent(1, rounds - 1) + 2 * sent(2, rounds - 1)) / 3
    torch.testing.assert_close(plain["w"], expected, atol=ATOL, rtol=0)
    # the plaintext tensor: folded in plaintext (the mean of +1 and +2 a round)
    torch.testing.assert_close(plain["bn.mean"], torch.full((4,), rounds * 5 / 3), atol=1e-5, rtol=0)
    # what the script of round 1 was handed: version 1, in plaintext
    got = torch.load(next((tmp_path / "site-2").rglob("received-1.pt")))
    assert got["w"].dtype == torch.float32
    torch.testing.assert_close(got["w"], (sent(1, 0) + 2 * sent(2, 0)) / 3, atol=ATOL, rtol=0)


async def test_a_site_without_the_he_context_refuses_the_job(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    kit = kits(tmp_path)
    async with Broker(broker_config(tmp_path, kit)) as broker:
        one = site(tmp_path, "site-1", broker.address, None)
        two = site(tmp_path, "site-2", broker.address, kit / "site-2" / "he_context.secret")
        async with one, two:
            await until(lambda: broker.registry.online() == ["site-1", "site-2"], what="both sites online")
            async with Admin(broker.address) as admin:
                job_id = await admin.submit(write_job(tmp_path / "job", 1))
                await until(lambda: broker.store.events(job_id, "crashed"), what="site-1 refusing the job")
                (event,) = broker.store.events(job_id, "crashed")
                await admin.abort(job_id)
    assert event["site"] == "site-1"
    assert "no he_context" in json.dumps(event["data"])
