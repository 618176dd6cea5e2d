"""The site's differential-privacy budget: the accountant against published values, the ledger's refusal and
persistence, a real site daemon refusing to send past its budget (and still refusing after a restart), and
``fedbus audit --privacy``."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from fedbus import cli
from fedbus.audit import AuditLog, read_audit
from fedbus.config import SiteConfig
from fedbus.errors import ConfigError
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.messages import Deploy, Task
from fedbus.site import Site
from fedbus.site.filters import FilterContext, GaussianDP, filter_metrics, site_filters
from fedbus.site.privacy_budget import PrivacyBudget, PrivacyBudgetSpent, epsilon_of
from tests.site.helpers import HEARTBEAT_S, PLUS_ONE, WAIT, FakeBroker, fake_broker, job_archive, sample_model

pytest.importorskip("opacus", reason="the privacy budget needs opacus (pip install 'fedbus[privacy]')")
scipy_stats = pytest.importorskip("scipy.stats", reason="the closed form needs scipy (an opacus dependency)")

pytestmark = pytest.mark.timeout(90)


def test_rdp_epsilon_matches_the_published_value() -> None:
    """Opacus's own published check (pytorch/opacus, opacus/tests/accountants_test.py, ``test_rdp_accountant``):
    noise multiplier 1.5, sampling rate 0.04, int(90 / 0.04) = 2250 steps, delta 1e-5 give epsilon
    7.32911117143 with the RDP accountant. The ledger composes through the same accountant."""
    assert epsilon_of([(1.5, 0.04, int(90 / 0.04))], 1e-5, "rdp") == pytest.approx(7.32911117143, abs=1e-8)


def _exact_gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """Exact epsilon of ``steps`` Gaussian mechanisms (sensitivity 1, noise multiplier sigma, no sampling).

    Their composition is exactly one Gaussian mechanism of noise multiplier sigma / sqrt(steps), i.e. mu-GDP
    with mu = sqrt(steps) / sigma (Dong, Roth, Su, "Gaussian Differential Privacy", 2019, Corollary 3.3), whose
    privacy profile is delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Balle and Wang, "Improving
    the Gaussian Mechanism for Differential Privacy", ICML 2018, Theorem 8). Solved for eps by bisection."""
    mu = math.sqrt(steps) / sigma
    Phi = scipy_stats.norm.cdf

    def profile(eps: float) -> float:
        return float(Phi(-eps / mu + mu / 2) - math.exp(eps) * Phi(-eps / mu - mu / 2))

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if profile(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize(("sigma", "steps"), [(1.0, 1), (2.0, 10), (4.0, 100), (20.0, 1)])
def test_site_level_releases_against_the_exact_gaussian_composition(sigma: float, steps: int) -> None:
    """At sampling rate 1 (the site's filter) the exact epsilon is known in closed form: PRV reproduces it
    within its stated error, RDP is an upper bound on it (and not a loose one)."""
    exact = _exact_gaussian_epsilon(sigma, steps, 1e-5)
    prv = epsilon_of([(sigma, 1.0, steps)], 1e-5, "prv")
    rdp = epsilon_of([(sigma, 1.0, steps)], 1e-5, "rdp")
    assert prv == pytest.approx(exact, abs=0.05)
    assert exact <= rdp <= exact * 1.25


def test_the_ledger_refuses_past_its_budget_and_a_new_process_continues(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl", actor="site-a")
    e = [epsilon_of([(2.0, 1.0, n)], 1e-5) for n in (1, 2, 3)]
    cap = (e[1] + e[2]) / 2  # two releases fit, a third does not
    budget = PrivacyBudget(tmp_path / "privacy", delta=1e-5, max_epsilon=cap, site="site-a", audit=audit)
    dp = GaussianDP(1.0, 2.0, budget=budget)
    update = {"w": torch.ones(100)}
    for i in range(2):
        dp(update, FilterContext("j1", f"t-{i}", "DIFF"))
        assert filter_metrics([dp], "j1", f"t-{i}") == {"privacy/epsilon": pytest.approx(e[i]), "privacy/delta": 1e-5}
    assert filter_metrics([dp], "j1", "t-0") == {}  # reported once
    with pytest.raises(PrivacyBudgetSpent, match="would spend epsilon .* > dp_max_epsilon"):
        dp(update, FilterContext("j1", "t-2", "DIFF"))
    assert budget.spent("j1") == pytest.approx(e[1])  # the refused update spent nothing
    assert budget.spent("j2") == 0.0  # per job

    again = PrivacyBudget(tmp_path / "privacy", delta=1e-5, max_epsilon=cap, site="site-a", audit=audit)
    assert again.history("j1") == [(2.0, 1.0, 2)] and again.spent("j1") == pytest.approx(e[1])
    with pytest.raises(PrivacyBudgetSpent):
        again.spend("j1", "t-3", 2.0)
    looser = PrivacyBudget(tmp_path / "privacy", delta=1e-3, site="site-a")  # recomputed for another delta
    assert looser.spent("j1") == pytest.approx(epsilon_of([(2.0, 1.0, 2)], 1e-3)) and looser.spent("j1") < e[1]

    kinds = [(r["kind"], r["task"]) for r in read_audit(tmp_path / "audit.jsonl")]
    spent, refused = ("privacy_spent", "privacy_refused")
    assert kinds == [(spent, "t-0"), (spent, "t-1"), (refused, "t-2"), (refused, "t-3")]

    (tmp_path / "privacy" / "j1.json").write_text("{torn")
    with pytest.raises(Exception, match="unreadable privacy ledger"):  # never read as "nothing spent"
        again.spend("j1", "t-4", 2.0)


def test_budget_config_is_checked() -> None:
    base = {"name": "s", "dp_clip": 1.0, "dp_sigma": 1.0}
    with pytest.raises(ConfigError, match="dp_max_epsilon needs dp_delta"):
        SiteConfig(**base, dp_max_epsilon=3.0)
    with pytest.raises(ConfigError, match="needs dp_clip and dp_sigma"):
        SiteConfig(name="s", dp_delta=1e-5)
    with pytest.raises(ConfigError, match="needs dp_clip and dp_sigma"):
        SiteConfig(name="s", dp_clip=1.0, dp_sigma=0.0, dp_delta=1e-5)
    with pytest.raises(ConfigError, match="dp_delta"):
        SiteConfig(**base, dp_delta=1.5)
    with pytest.raises(ConfigError, match="dp_accountant"):
        SiteConfig(**base, dp_delta=1e-5, dp_accountant="moments")
    assert site_filters(SiteConfig(**base), "/nonexistent")[0].budget is None  # no delta: no accounting


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[FakeBroker]:
    async with fake_broker(tmp_path) as fake:
        yield fake


@contextlib.asynccontextmanager
async def budgeted_site(workspace: Path, broker: str, cap: float) -> AsyncIterator[Site]:
    cfg = SiteConfig(
        name="site-a",
        broker=broker,
        workspace=str(workspace),
        heartbeat_s=HEARTBEAT_S,
        liveness=5,
        dp_clip=1.0,
        dp_sigma=2.0,
        dp_delta=1e-5,
        dp_max_epsilon=cap,
    )
    site = Site(cfg, shutdown_timeout_s=10.0, end_grace_s=5.0, kill_after_s=1.0)
    await asyncio.wait_for(site.__aenter__(), WAIT)
    try:
        yield site
    finally:
        await asyncio.wait_for(site.__aexit__(None, None, None), WAIT)


async def _train(broker: FakeBroker, job: str, task: str, version: int) -> None:
    sid = secrets.randbits(62)
    await broker.send(Task(job, task, "train", version, version, 9, sid=sid, meta={"params_type": "FULL"}))
    src = ModelSource.from_state_dict(sample_model())
    await asyncio.wait_for(broker.hub.send(broker.peer, src, {"job_id": job, "task_id": task}, sid), WAIT)


async def test_a_site_refuses_to_send_past_its_budget_even_after_a_restart(tmp_path: Path, broker: FakeBroker) -> None:
    e = [epsilon_of([(2.0, 1.0, n)], 1e-5) for n in (1, 2, 3)]
    cap = (e[1] + e[2]) / 2  # two updates fit in the budget
    archive = job_archive(tmp_path / "job", PLUS_ONE, args=("--delta", "1.0"))
    deploy = Deploy("j1", "client.py", ["--delta", "1.0"], {"site_index": 0, "num_sites": 1, "params_type": "FULL"})
    ws = tmp_path / "ws"
    async with budgeted_site(ws, broker.address, cap):
        await broker.wait_hellos(1)
        await broker.send(deploy, [archive])
        await broker.expect("job_event", event="started")
        for i in range(2):
            await _train(broker, "j1", f"t-{i}", i + 1)
            result, sink = await asyncio.wait_for(broker.uploads.get(), WAIT)
            params = await sink.result
            assert result.task_id == f"t-{i}"
            assert result.metrics["privacy/epsilon"] == pytest.approx(e[i]) and result.metrics["privacy/delta"] == 1e-5
            moved = math.sqrt(sum(float(((params[k] - v) ** 2).sum()) for k, v in sample_model().items()))
            assert moved > 10  # clipped to 1, then noise of std 2 on 307 elements: not the script's +1 per element
        await _train(broker, "j1", "t-2", 3)  # the third would exceed the budget: refused at the site
        crashed = await broker.expect("job_event", event="crashed")
        assert "privacy budget of site 'site-a' for job 'j1' exhausted" in crashed.detail
    assert broker.uploads.empty()

    async with budgeted_site(ws, broker.address, cap):  # a restarted site continues from what it spent
        await broker.wait_hellos(2)
        await broker.send(deploy, [archive])
        await broker.expect("job_event", event="started")
        await _train(broker, "j1", "t-3", 4)
        crashed = await broker.expect("job_event", event="crashed")
        assert "2 updates released" in crashed.detail
    assert broker.uploads.empty()

    records = list(read_audit(ws / "audit.jsonl"))
    spent = [r for r in records if r["kind"] == "privacy_spent"]
    refused = [r for r in records if r["kind"] == "privacy_refused"]
    assert [r["releases"] for r in spent] == [1, 2] and [r["task"] for r in refused] == ["t-2", "t-3"]
    sent = [r for r in records if r["kind"] == "update_sent"]
    assert [r["task"] for r in sent] == ["t-0", "t-1"]

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["audit", str(ws / "audit.jsonl"), "--privacy"]) == 0
    header, row = out.getvalue().splitlines()
    assert header.split() == ["JOB", "SITE", "EPSILON", "DELTA", "MAX", "RELEASES", "REFUSED"]
    job, site, eps, delta, cap_text, releases, n_refused = row.split()
    assert (job, site, float(eps), float(delta), releases, n_refused) == (
        "j1",
        "site-a",
        round(e[1], 4),
        1e-5,
        "2",
        "2",
    )
    assert float(cap_text) == pytest.approx(cap, rel=1e-5)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["audit", str(ws / "audit.jsonl"), "--privacy", "--json", "--job", "j1"]) == 0
    (doc,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert doc["epsilon"] == pytest.approx(e[1], abs=1e-6) and doc["releases"] == 2 and doc["refused"] == 2


async def test_the_job_status_shows_epsilon_and_a_spent_budget_fails_the_task_at_the_broker(tmp_path: Path) -> None:
    """A real broker and two budgeted sites: a 2-round job fits the budget and its status shows the epsilon
    the sites report; a 3-round job is refused at the sites in round 3, and the broker hears why."""
    from fedbus.admin import Admin
    from fedbus.broker import Broker
    from fedbus.config import BrokerConfig
    from tests.broker.harness import wait_job
    from tests.security.helpers import patterned_model, write_job

    e = [epsilon_of([(2.0, 1.0, n)], 1e-5) for n in (1, 2, 3)]
    cap = (e[1] + e[2]) / 2
    cfg = BrokerConfig(bind=f"ipc://{tmp_path}/b.sock", workspace=str(tmp_path / "broker"), heartbeat_s=0.5)
    async with Broker(cfg) as broker, contextlib.AsyncExitStack() as stack:
        for name in ("site-1", "site-2"):
            site_cfg = SiteConfig(
                name=name,
                broker=broker.address,
                workspace=str(tmp_path / name),
                heartbeat_s=0.2,
                dp_clip=1.0,
                dp_sigma=2.0,
                dp_delta=1e-5,
                dp_max_epsilon=cap,
            )
            await stack.enter_async_context(Site(site_cfg))
        async with Admin(broker.address) as admin:
            model = patterned_model(1024)
            fits = await admin.submit(write_job(tmp_path / "fits", model, rounds=2))
            state = await wait_job(admin, fits, timeout=60.0)
            assert state["state"] == "finished", state
            assert state["last_metrics"]["privacy/epsilon"] == pytest.approx(e[1])  # both sites: 2 releases
            assert state["last_metrics"]["privacy/delta"] == pytest.approx(1e-5)

            over = await admin.submit(write_job(tmp_path / "over", model, rounds=3))
            state = await wait_job(admin, over, timeout=60.0)
            assert state["state"] == "failed", state
        failed = [u["reason"] for u in broker.store.updates(over) if not u["accepted"]]
    assert failed and all("privacy budget of site" in r and "exhausted" in r for r in failed), failed
    for name in ("site-1", "site-2"):
        records = list(read_audit(tmp_path / name / "audit.jsonl"))
        assert [r["releases"] for r in records if r["kind"] == "privacy_spent" and r["job"] == over] == [1, 2]
        assert [r["job"] for r in records if r["kind"] == "privacy_refused"] == [over]
