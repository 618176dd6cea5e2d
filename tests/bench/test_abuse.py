"""``fedbus bench abuse`` runs end to end at a tiny size: every attack kind, its figures reported, the good sites
trained in every quiet phase (not speed, nor whether the goals are met: the bench reports those)."""

from __future__ import annotations

import pytest

from fedbus.bench.abuse import ATTACKS, run_abuse

pytestmark = pytest.mark.timeout(240)

FIGURES = {"attack", "mode", "quiet_ups", "attack_ups", "ratio", "recover_s", "responsive", "ok", "sent", "broker_cpu"}


def _check(figures: dict, modes: list[str], attacks: list[str]) -> None:
    rows = figures["results"]
    assert [(r["mode"], r["attack"]) for r in rows] == [(m, a) for m in modes for a in attacks]
    for row in rows:
        assert set(row) >= FIGURES, row
        assert row["quiet_ups"] > 0, row  # the good sites made progress before each attack
        assert row["sent"] > 0 or row["attack"] == "slowloris", row  # the attackers did attack
    assert sorted(figures["passed"] + figures["failed"]) == sorted(f"{r['mode']}:{r['attack']}" for r in rows)


def test_every_attack_reports_its_figures() -> None:
    """One broker with CURVE (the production setting) for every attack kind: a phase of half a second each."""
    report, figures = run_abuse(sites=2, attackers=1, seconds=0.5, recover_s=1.0, modes=("curve",), fresh=False)
    _check(figures, ["curve"], list(ATTACKS))
    assert report.splitlines()[0].startswith("setup")
    assert figures["results"][-1]["sigterm_s"] is None or figures["results"][-1]["sigterm_s"] > 0
