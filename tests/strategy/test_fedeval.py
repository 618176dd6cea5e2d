"""FedEval: one evaluate task of the start model per site, Evaluated for each answer, never a Publish."""

from __future__ import annotations

import pytest
import torch

from fedbus.errors import ConfigError
from fedbus.strategy import Cancel, Dispatch, Evaluated, Failed, FedEval, Finished, Publish, Rejected, make_strategy

from .helpers import answer, of


def model() -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([1.0, 2.0])}


def test_every_site_evaluates_the_start_version_and_the_job_finishes() -> None:
    s = FedEval(min_clients=2)
    acts = s.start(model(), ["b", "a"], now=0.0, version=3)
    assert [(d.site, d.version, d.kind) for d in of(acts, Dispatch)] == [("a", 3, "evaluate"), ("b", 3, "evaluate")]
    d = {x.site: x for x in of(acts, Dispatch)}
    (ev,) = s.on_update(answer(d["a"], None, metrics={"accuracy": 0.75, "bad": float("nan")}), 1.0)
    assert ev == Evaluated(3, "a", {"accuracy": 0.75})
    acts = s.on_update(answer(d["b"], None, metrics={"accuracy": 0.5}), 2.0)
    assert acts[0] == Evaluated(3, "b", {"accuracy": 0.5})
    assert isinstance(acts[-1], Finished) and "2 of 2 sites reported on version 3" in acts[-1].reason
    assert not of(acts, Publish) and s.version == 3 and torch.equal(s.model["w"], torch.tensor([1.0, 2.0]))
    (rej,) = s.on_update(answer(d["b"], None), 3.0)
    assert isinstance(rej, Rejected)


def test_waits_for_min_clients_and_asks_late_and_returning_sites() -> None:
    s = FedEval(min_clients=2)
    assert s.start(model(), ["a"], now=0.0) == []
    acts = s.site_joined("b", 1.0)
    d = {x.site: x for x in of(acts, Dispatch)}
    assert sorted(d) == ["a", "b"]
    (late,) = s.site_joined("c", 2.0)  # joins during the evaluation: asked too
    assert late.site == "c" and late.kind == "evaluate"
    assert s.site_left("a", 3.0) == []  # its task is lost ...
    (again,) = s.site_joined("a", 4.0)  # ... and asked again when it comes back
    assert again.site == "a" and again.task_id != d["a"].task_id
    s.on_update(answer(again, None, metrics={"loss": 1.0}), 5.0)
    s.on_update(answer(d["b"], None, metrics={"loss": 2.0}), 5.0)
    (done,) = of(s.on_update(answer(late, None, metrics={"loss": 3.0}), 6.0), Finished)
    assert "3 of 3 sites reported" in done.reason


def test_timeout_finishes_with_enough_reports_and_fails_with_too_few() -> None:
    s = FedEval(min_clients=1, eval_timeout=5.0)
    d = {x.site: x for x in of(s.start(model(), ["a", "b"], now=0.0), Dispatch)}
    s.on_update(answer(d["a"], None, metrics={"accuracy": 1.0}), 1.0)
    assert s.next_deadline == 5.0 and s.tick(4.9) == []
    acts = s.tick(5.0)
    assert acts[0] == Cancel("b", d["b"].task_id, "evaluation timed out") and isinstance(acts[-1], Finished)
    s = FedEval(min_clients=2)
    d = {x.site: x for x in of(s.start(model(), ["a", "b"], now=0.0), Dispatch)}
    s.on_update(answer(d["a"], None), 1.0)
    (end,) = s.task_failed("b", d["b"].task_id, "crashed", 2.0)
    assert isinstance(end, Failed) and "1 of 2 sites reported" in end.reason and "min_clients=2" in end.reason


@pytest.mark.parametrize(
    ("kw", "needle"),
    [({"min_clients": 0}, "FedEval: min_clients must be"), ({"eval_timeout": -1}, "FedEval: eval_timeout must be")],
)
def test_arguments_are_checked_by_name(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_strategy("fedeval", **kw)
    assert needle in str(err.value)
