"""Hostile peers against a real broker process (issue: no participant can hang, flood or fill the broker).

One test per attack class, each over real sockets: the attack is refused or absorbed, a good site (a real site
process) trains a small job to the end meanwhile, and the broker's log and audit trail account for every refused
message in a few records whose counts add up. The plaintext attacks share one broker and site (module scope:
each test has attackers and a job of its own); the broker must end on SIGTERM while attackers of every kind
are at it (the shared broker at the module's end, the CURVE test's at its own), within a generous bound: a
liveness check, not a timing one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedbus.admin import Admin
from fedbus.protocol.envelope import encode
from fedbus.protocol.messages import Credit, Heartbeat, Hello, Offer, Request
from fedbus.site import Site
from tests.e2e.procs import Daemon, start_site
from tests.security.helpers import keys, make_kits, site_config
from tests.security.hostile import (
    audit,
    counted,
    non_reader,
    run_job,
    start_broker,
    stop_promptly,
    wait_counted,
    write_job,
)

pytestmark = pytest.mark.timeout(90)
N = 5_000
FEDAVG = 'name = "fedavg"\nmin_clients = 1\nnum_rounds = 1\n'
PROFILE = (  # the download test's: a small peer queue, cut off after a second full; others see the defaults' logic
    "chunk_mb = 1\nmax_streams_per_peer = 1\npeer_queue = 200\nstuck_peer_s = 1.0\n"
)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, str, Path]]:
    """A plaintext broker process and one good site process, shared by the module's plaintext attacks. At the end
    the broker must end on SIGTERM while attackers of every kind are at it."""
    tmp = tmp_path_factory.mktemp("hostile")
    broker, address = start_broker(tmp, PROFILE)
    site = start_site(tmp, "good", address)
    try:
        site.wait_for("welcomed by the broker")
        yield broker, address, tmp
        with (
            non_reader(address, b"flood-1") as f1,
            non_reader(address, b"flood-2") as f2,
            non_reader(address, b"site:sponge-2") as sponge,
        ):
            sponge.send(Hello(role="site", name="sponge-2", session="s1"))
            f1.keep_flooding(lambda i: [encode(Credit(sid=i, until=1 << 20), i + 1)])
            f2.keep_flooding(lambda i: [b"\xc1 not msgpack"])
            sponge.keep_flooding(lambda i: [encode(Heartbeat(), i + 1)])
            assert counted(wait_counted(broker, "flood-2", 1)) >= 1  # the floods are being refused
            assert stop_promptly(broker) == 0
    finally:
        site.stop()
        broker.stop()


def _refused(tmp: Path, peer: str) -> list[dict]:
    return [r for r in audit(tmp) if r["kind"] == "refused" and peer in (str(r.get("peer")), str(r.get("by")))]


async def test_a_non_reading_flood_of_stream_messages_before_hello(plain, tmp_path: Path) -> None:
    broker, address, tmp = plain
    with non_reader(address, b"flood-a") as flood:
        assert flood.flood(lambda i: [encode(Credit(sid=i, until=1 << 20), i + 1)], N) == N
        async with Admin(address) as admin:
            job = await run_job(admin, write_job(tmp_path / "job", FEDAVG))
        assert job["state"] == "finished", job
        lines = await asyncio.to_thread(wait_counted, broker, "flood-a", N)
        assert counted(lines) == N  # every message counted: none slipped past the meter
        assert len(lines) <= 12, lines  # and a handful of records, not one per message
        # past SHED_AFTER refusals the peer is shed: the rest dropped on receipt, before any decode, and counted
        assert {r["code"] for r in lines if "code" in r} == {"hello_required", "rate_limited", "cut_off"}, lines
        assert [r["for_s"] for r in lines if r["event"] == "peer shed: it floods refused messages"] == [2.0]
    records = _refused(tmp, "flood-a")  # rate_limited is audited (hello_required is what every restart makes)
    assert 1 <= len(records) <= 12 and {r["code"] for r in records} == {"rate_limited", "cut_off"}


async def test_a_refused_message_flood_plaintext(plain, tmp_path: Path) -> None:
    """Undecodable messages and requests without an admin hello, from one peer that never reads."""
    broker, address, tmp = plain
    with non_reader(address, b"flood-b") as flood:
        half = N // 2
        assert flood.flood(lambda i: [b"\xc1 not msgpack"], half) == half  # bad_message
        assert flood.flood(lambda i: [encode(Request(rid=i, op="sites"), i + 1)], half) == half  # refused
        async with Admin(address) as admin:
            job = await run_job(admin, write_job(tmp_path / "job", FEDAVG))
        assert job["state"] == "finished", job
        lines = await asyncio.to_thread(wait_counted, broker, "flood-b", N)
        assert counted(lines) == N and len(lines) <= 12, lines
    records = _refused(tmp, "flood-b")
    assert sum(r["count"] for r in records) == N and len(records) <= 12, records
    assert {r["code"] for r in records} <= {"bad_message", "refused", "rate_limited", "cut_off"}


async def test_a_refused_message_flood_with_curve(tmp_path: Path) -> None:
    """A valid site key sending under a routing id that is not its own: every message unauthorized."""
    kits = make_kits(tmp_path)
    secure = f'secret_key = "{kits}/broker/broker.key_secret"\nparticipants = "{kits}/broker/participants.toml"\n'
    broker, address = start_broker(tmp_path, secure)
    stolen = keys(kits, "site-2")
    try:
        with non_reader(address, b"not-site-2", curve=stolen.as_tuple()) as flood:
            assert flood.flood(lambda i: [encode(Heartbeat(), i + 1)], N) == N
            site = Site(site_config(tmp_path, kits, "site-1", address))
            async with site, Admin(address, keys=keys(kits, "ops")) as admin:
                job = await run_job(admin, write_job(tmp_path / "job", FEDAVG))
            assert job["state"] == "finished", job
            lines = await asyncio.to_thread(wait_counted, broker, "site-2", N)
            assert counted(lines) == N and len(lines) <= 12, lines
            records = _refused(tmp_path, "site-2")  # written with the log's records
            assert sum(r["count"] for r in records) == N and len(records) <= 12, records
            assert {r["code"] for r in records} <= {"unauthorized", "rate_limited", "cut_off"}
            flood.keep_flooding(lambda i: [encode(Heartbeat(), i + 1)])  # still at it when SIGTERM comes
            assert await asyncio.to_thread(stop_promptly, broker) == 0
    finally:
        broker.stop()


async def test_a_peer_that_stops_reading_during_a_model_download(plain, tmp_path: Path) -> None:
    """A site takes a task, grants credit for the whole model, then never reads and asks for heartbeats: its
    queue fills, what does not fit is dropped, and it is cut off; the job goes on with the good site."""
    broker, address, tmp = plain
    with non_reader(address, b"site:sponge") as sponge:
        sponge.send(Hello(role="site", name="sponge", session="s1"))
        await asyncio.to_thread(sponge.read_until, lambda m: m.TYPE == "welcome")
        fedbuff = 'name = "fedbuff"\nconcurrency = 2\nbuffer_size = 1\nnum_versions = 2\n'
        async with Admin(address) as admin:
            folder = write_job(tmp_path / "job", fedbuff, sites=2, size=2 << 20)  # 8 MiB: 8 chunks
            job_id = await admin.submit(folder)
            offer = await asyncio.to_thread(sponge.read_until, lambda m: isinstance(m, Offer) and "task_id" in m.route)
            assert isinstance(offer, Offer)
            sponge.send(Credit(offer.sid, offer.total))  # all of it, and then never read again
            # about 1,000 a second: answered within its budget, refused past it, never enough to be shed
            sponge.keep_flooding(lambda i: [encode(Heartbeat(), i + 1)], batch=1)
            job = await run_job(admin, None, job_id=job_id)
        assert job["state"] == "finished", job
        cut = [r for r in broker.lines if r.get("event") == "peer cut off: its queue stayed full"]
        assert cut and "sponge" in str(cut[0]["peer"])
    assert any(r["kind"] == "cut_off" and "sponge" in r["peer"] for r in audit(tmp))
