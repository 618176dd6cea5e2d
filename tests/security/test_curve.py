"""CurveZMQ at the broker, over real tcp sockets: who may connect, and as whom.

Each refusal is checked where the refused peer sees it (an error or a failed handshake) and in the
broker's audit log, with its reason."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from fedbus.admin import Admin, from_kit
from fedbus.errors import FedbusError, TransportError
from fedbus.protocol.messages import Error, Hello, Request, Welcome
from fedbus.security import ClientKeys
from fedbus.site import Site
from fedbus.transport.curve import create_keypair, handshake_refused
from fedbus.transport.endpoint import DealerEndpoint
from tests.security.helpers import audit_of, keys, make_kits, secure_broker, site_config, until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ctx() -> Iterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


def _site_dealer(ctx: zmq.asyncio.Context, address: str, name: str, k: ClientKeys) -> DealerEndpoint:
    """A bare site connection, as the daemon makes it (its route carries the key's token)."""
    return DealerEndpoint.connect(
        ctx, address, identity=f"site:{name}:{k.routing_token()}".encode(), curve=k.as_tuple()
    )


async def _hello(ep: DealerEndpoint, hello: Hello, timeout: float = 5.0) -> object:
    await ep.send(b"", hello)
    return (await asyncio.wait_for(ep.recv(), timeout)).msg


async def test_plaintext_peer_is_refused(tmp_path: Path) -> None:
    kits = make_kits(tmp_path)
    async with secure_broker(tmp_path, kits) as broker:
        with pytest.raises(TransportError, match="no answer"):
            async with Admin(broker.address, timeout=1.0):
                pass
        audit = tmp_path / "broker" / "audit.jsonl"
        await until(lambda: audit_of(audit, "connection_refused"), what="the refusal in the audit log")
        (rec,) = audit_of(audit, "connection_refused")[:1]
        assert "plaintext" in rec["reason"]
        assert not broker.registry.admins


async def test_unknown_key_is_refused(tmp_path: Path) -> None:
    kits = make_kits(tmp_path)
    _, secret = create_keypair(tmp_path / "intruder", "intruder")
    stranger = ClientKeys.load(secret, kits / "ops" / "broker.key")
    async with secure_broker(tmp_path, kits) as broker:
        with pytest.raises(TransportError, match="refused this key"):
            async with Admin(broker.address, timeout=5.0, keys=stranger):
                pass
        (rec,) = audit_of(tmp_path / "broker" / "audit.jsonl", "connection_refused")[:1]
        assert rec["reason"] == "unknown key" and rec["key"] == stranger.public.decode()
        # the right keys get in, through the admin kit
        admin = from_kit(kits / "ops", timeout=5.0)
        admin.address = broker.address
        async with admin:
            assert (await admin.status())["jobs"] == []


async def test_admin_kit_connects(tmp_path: Path) -> None:
    kits = make_kits(tmp_path)
    async with secure_broker(tmp_path, kits) as broker:
        admin = from_kit(kits / "ops", timeout=5.0)
        admin.address = broker.address
        async with admin:
            assert (await admin.status())["sites"] == []
        (hello,) = audit_of(tmp_path / "broker" / "audit.jsonl", "hello")
        assert hello["by"] == "ops" and hello["key"] == keys(kits, "ops").public.decode()


async def test_site_cannot_claim_another_sites_name(tmp_path: Path, ctx: zmq.asyncio.Context) -> None:
    kits = make_kits(tmp_path)
    own = keys(kits, "site-2")
    async with secure_broker(tmp_path, kits) as broker:
        # 1. site-2's key, hello as site-1, from site-2's own route
        ep = _site_dealer(ctx, broker.address, "site-2", own)
        try:
            reply = await _hello(ep, Hello(role="site", name="site-1", session="s"))
            assert isinstance(reply, Error) and "may not register as site 'site-1'" in reply.reason
        finally:
            ep.close()
        # 2. the real site daemon, configured with site-2's keys under the name site-1
        cfg = site_config(tmp_path, kits, "site-1", broker.address)
        cfg.secret_key, cfg.broker_key = str(kits / "site-2" / "site-2.key_secret"), str(kits / "site-2" / "broker.key")
        async with Site(cfg):
            audit = tmp_path / "broker" / "audit.jsonl"
            await until(lambda: len(audit_of(audit, "refused")) >= 2, what="the daemon's refusal")
        assert "site-1" not in broker.registry.sites and "site-2" not in broker.registry.sites
        reasons = [r["reason"] for r in audit_of(audit, "refused")]
        assert "site-2: the key of site 'site-2' may not register as site 'site-1'" in reasons  # culprit first
        assert any("does not belong to site 'site-2'" in r for r in reasons)
        assert all(r["by"] == "site-2" for r in audit_of(audit, "refused"))


async def test_site_key_cannot_submit_a_job(tmp_path: Path, ctx: zmq.asyncio.Context) -> None:
    kits = make_kits(tmp_path)
    async with secure_broker(tmp_path, kits) as broker:
        with pytest.raises(FedbusError, match="site 'site-1'"):  # the admin client, with a site's key
            async with Admin(broker.address, timeout=5.0, keys=keys(kits, "site-1")):
                pass
        k = keys(kits, "site-1")
        ep = _site_dealer(ctx, broker.address, "site-1", k)  # from the site's own route: hello as admin
        reply = await _hello(ep, Hello(role="admin", name="site-1", session="s"))
        assert isinstance(reply, Error) and "the key of site 'site-1' may not say hello as 'admin'" in reply.reason
        # straight to a submit request, no hello: refused too, and no job exists
        try:
            await ep.send(b"", Request(rid=1, op="submit", args={"model_bytes": 10}), [b"zip"])
            reply = (await asyncio.wait_for(ep.recv(), 5.0)).msg
            assert isinstance(reply, Error) and "hello as an admin" in reply.reason
        finally:
            ep.close()
        assert broker.store.jobs() == []
        reasons = [r["reason"] for r in audit_of(tmp_path / "broker" / "audit.jsonl", "refused")]
        assert "site-1: the key of site 'site-1' may not say hello as 'admin'" in reasons
        assert "site-1: say hello as an admin before sending requests" in reasons


async def test_revoked_key_is_refused_and_its_connection_closed(tmp_path: Path, ctx: zmq.asyncio.Context) -> None:
    kits = make_kits(tmp_path)
    async with secure_broker(tmp_path, kits) as broker:
        k = keys(kits, "site-2")
        ep = DealerEndpoint.connect(
            ctx, broker.address, identity=f"site:site-2:{k.routing_token()}".encode(), curve=k.as_tuple()
        )
        monitor = ep.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        async with Site(site_config(tmp_path, kits, "site-1", broker.address)):
            try:
                assert isinstance(await _hello(ep, Hello(role="site", name="site-2", session="s")), Welcome)
                await until(lambda: broker.registry.online() == ["site-1", "site-2"], what="both sites online")

                make_kits(tmp_path, revoked=("site-2",))  # re-provision: keys kept, site-2 marked revoked
                event = parse_monitor_message(await asyncio.wait_for(monitor.recv_multipart(), 10.0))
                assert event["event"] == zmq.EVENT_DISCONNECTED  # the broker closed the open connection
                await until(lambda: "site-2" not in broker.registry.online(), what="site-2 gone")
                # at its next connect the key is refused at the handshake
                retry = DealerEndpoint.connect(ctx, broker.address, curve=k.as_tuple())
                try:
                    reason = await asyncio.wait_for(handshake_refused(retry.sock), 10.0)
                    assert "unknown or revoked" in reason
                finally:
                    retry.close()
                # the site daemon with the revoked kit says why it cannot connect
                async with Site(site_config(tmp_path, kits, "site-2", broker.address)):
                    site_audit = tmp_path / "site-2" / "audit.jsonl"
                    await until(lambda: audit_of(site_audit, "connection_refused"), what="the site's own record")
                    assert "unknown or revoked" in audit_of(site_audit, "connection_refused")[0]["reason"]
                # site-1 was not revoked: it is back (its socket reconnected by itself) and stays online
                assert broker.registry.online() == ["site-1"]
            finally:
                ep.sock.disable_monitor()
                monitor.close(linger=0)
                ep.close()
        audit = tmp_path / "broker" / "audit.jsonl"
        assert [r["site"] for r in audit_of(audit, "revoked")] == ["site-2"]
        refused = [r for r in audit_of(audit, "connection_refused") if r.get("reason") == "revoked key"]
        assert refused and refused[0]["key"] == k.public.decode()


def test_secret_key_files_must_be_private(tmp_path: Path) -> None:
    kits = make_kits(tmp_path)
    secret = kits / "site-1" / "site-1.key_secret"
    os.chmod(secret, 0o644)
    with pytest.raises(FedbusError, match="chmod 600"):
        keys(kits, "site-1")
