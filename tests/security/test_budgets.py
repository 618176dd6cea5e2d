"""Per-peer budgets and refusal bursts (``fedbus.broker.limits``), the profile's checks of them, ZAP's cool-down:
pure logic, no sockets."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fedbus.broker.limits import PeerLimits, Refusals
from fedbus.broker.meter import Meter
from fedbus.broker.metrics import _hostile_peers, _Text
from fedbus.config import SITE_WINDOW_MB, BrokerConfig
from fedbus.errors import ConfigError
from fedbus.transport.curve import ZAP_VERSION, Authenticator, curve_keypair, decode_z85
from fedbus.transport.overflow import Overflow
from fedbus.transport.streams import DEFAULT_WINDOW


def test_every_message_counts_but_open_stream_traffic() -> None:
    lim = PeerLimits(10.0, 5, 8)
    assert all(lim.admit(b"p", "credit", 0.0, in_stream=True) for _ in range(1000))  # credit bounds it
    assert [lim.admit(b"p", "credit", 0.0) for _ in range(6)] == [True] * 5 + [False]  # no such stream: metered
    assert not lim.admit(b"p", "offer", 0.0, in_stream=True)  # an offer opens a stream: always metered
    assert lim.admit(b"p", "heartbeat", 0.1)  # a token per 0.1 s
    assert lim.admit(b"q", "heartbeat", 0.1)  # another peer has its own budget
    assert (lim.refused, lim.refused_by["messages"], lim.free) == (2, 2, 1000)


def test_bytes_are_budgeted_too() -> None:
    lim = PeerLimits(1000.0, 1000, 8, byte_rate=100.0, byte_burst=1000)
    assert lim.check(b"p", "job_event", 0.0, 600) is None
    assert lim.check(b"p", "job_event", 0.0, 600) == "bytes"  # 400 left
    assert lim.check(b"p", "job_event", 2.0, 600) is None  # 400 + 200 refilled
    assert lim.refused_by == {"messages": 0, "bytes": 1}
    # a refusal for bytes spends no message token, and one for messages no bytes
    lim2 = PeerLimits(1.0, 1, 8, byte_rate=1.0, byte_burst=10)
    assert lim2.check(b"p", "x", 0.0, 20) is None  # larger than the burst: let through on a full bucket, in debt
    assert lim2.check(b"p", "x", 1.0, 1) == "bytes"
    assert lim2.check(b"p", "x", 31.0, 1) is None


def test_budgets_of_quiet_peers_are_forgotten_when_too_many() -> None:
    lim = PeerLimits(10.0, 2, 8, max_peers=3)
    for i in range(10):
        lim.admit(f"p{i}".encode(), "heartbeat", float(i))
    assert len(lim._budgets) <= 3


def test_a_flood_of_refusals_is_a_few_records_whose_counts_add_up() -> None:
    r = Refusals(gap=1.0, report_every=10.0)
    told = [r.refuse(b"p", "unauthorized", i * 0.001, reason="wrong routing id") for i in range(20_000)]
    assert [first for first, _ in told].count(True) == 1 and told[0] == (True, True)
    assert sum(answer for _, answer in told) == 20  # the first, then one a second
    assert r.due(5.0) == []  # a 20 s flood at 1,000/s, read at 5 s: not over, nor reported yet
    long = r.due(25.0)  # quiet since 19.999: the burst ended
    assert [(b.code, b.unreported, b.count) for b in long] == [("unauthorized", 19_999, 20_000)]
    assert r.due(30.0) == [] and r.total == {"unauthorized": 20_000} and r.bursts == {"unauthorized": 1}
    assert r.refuse(b"p", "unauthorized", 40.0) == (True, True)  # a new burst


def test_a_long_burst_is_reported_every_so_often_and_kinds_are_apart() -> None:
    r = Refusals(gap=1.0, report_every=10.0)
    reported = 1
    for i in range(3000):  # 30 s at 100/s
        now = i * 0.01
        r.refuse(b"p", "rate_limited", now)
        reported += sum(b.unreported for b in r.due(now))
    assert r.refuse(b"p", "bad_message", 30.0)[0]  # another kind: its own burst
    reported += sum(b.unreported for b in r.flush() if b.code == "rate_limited")
    assert reported == 3000
    assert r.flush() == []


def test_the_profile_keeps_credited_chunks_under_the_peer_queue() -> None:
    assert SITE_WINDOW_MB << 20 == DEFAULT_WINDOW  # the window a site grants a download
    assert BrokerConfig(chunk_mb=0.0625).peer_queue == 10_000  # 8 streams x 1,024 chunks + 100 fit the default
    BrokerConfig(chunk_mb=1, max_streams_per_peer=1, peer_queue=200)
    with pytest.raises(ConfigError, match=r"peer_queue \(200\) must be >= 612"):
        BrokerConfig(chunk_mb=1, max_streams_per_peer=8, peer_queue=200)
    with pytest.raises(ConfigError, match="max_mb_per_s"):
        BrokerConfig(max_mb_per_s=0)


def test_zap_refuses_a_cut_off_key_for_its_cool_down_and_reports_it_once() -> None:
    public, _ = curve_keypair()
    site = SimpleNamespace(name="site-2", revoked=False)
    allow = SimpleNamespace(by_key={public.decode(): site}, refresh=lambda: [])
    refused: list[str] = []
    auth = Authenticator(None, allow, lambda reason, details: refused.append(reason))  # type: ignore[arg-type]
    request = [ZAP_VERSION, b"1", b"fedbus", b"127.0.0.1", b"", b"CURVE", decode_z85(public)]
    assert auth.answer(request)[2:5] == [b"200", b"OK", b"site-2"]
    auth.refuse_for("site-2", 60.0)
    assert [auth.answer(request)[2] for _ in range(3)] == [b"400"] * 3  # a reconnect storm: refused, ...
    assert len(refused) == 1 and "cooling down" in refused[0]  # ... reported once
    auth.refuse_for("site-2", -1.0)  # the cool-down is over
    assert auth.answer(request)[2] == b"200"


def test_the_counters_are_in_the_metrics_under_their_names() -> None:
    meter = Meter(BrokerConfig(max_requests_per_s=1.0, request_burst=1), SimpleNamespace(), answer=None)
    meter.limits.check(b"p", "heartbeat", 0.0)
    meter.limits.check(b"p", "heartbeat", 0.0)  # over the message budget
    meter.refusals.refuse(b"p", "rate_limited", 0.0)
    overflow = Overflow(stuck_after=0.0, cooldown=1e9)
    overflow.full(b"site:a", 0.0)
    text = _Text()
    _hostile_peers(text, SimpleNamespace(meter=meter, router=SimpleNamespace(overflow=overflow)))
    page = "\n".join(text.lines)
    for line in (
        'fedbus_refused_messages_total{code="rate_limited"} 1',
        'fedbus_refusal_bursts_total{code="rate_limited"} 1',
        'fedbus_over_budget_total{budget="messages"} 1',
        "fedbus_send_dropped_total 1",
        'fedbus_peer_send_dropped_total{peer="site:a"} 1',
        "fedbus_peers_cut_off_total 1",
        "fedbus_peers_cut_off 1",
        "fedbus_cut_off_messages_total 0",
        "fedbus_stream_messages_unmetered_total 0",
    ):
        assert line in page, line
