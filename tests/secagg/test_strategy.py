"""SecureFedAvg without IO: sites played by SecAggClient objects, the strategy's Relay actions carried by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("cryptography", reason="secure aggregation needs the secagg extra (cryptography)")

from fedbus.errors import ConfigError
from fedbus.protocol.messages import SecAggRoster, SecAggShares, SecAggUnmask
from fedbus.secagg.config import SecAggConfig
from fedbus.secagg.protocol import SecAggClient
from fedbus.strategy import Accepted, Action, Dispatch, Failed, Finished, Publish, Update, make_strategy
from fedbus.strategy.base import Relay
from fedbus.strategy.secure_fedavg import SecureFedAvg

SITES = ["a", "b", "c", "d"]
MODEL = {"w": torch.zeros(3, 2), "b": torch.zeros(2), "n": torch.tensor(5)}


class Federation:
    """The sites of one round, answering the strategy's relayed messages as the site daemons would."""

    def __init__(self, strategy: SecureFedAvg, config: SecAggConfig) -> None:
        self.strategy, self.config = strategy, config
        self.clients: dict[str, SecAggClient] = {}
        self.tasks: dict[str, str] = {}
        self.gone: set[str] = set()
        self.out: list[Action] = []  # every action but relays

    def take(self, acts: list[Action]) -> None:
        queue = list(acts)
        while queue:
            act = queue.pop(0)
            if isinstance(act, Dispatch) and act.kind == "train":
                self.tasks[act.site] = act.task_id
                self.clients[act.site] = c = SecAggClient(act.site, self.config, act.version + 1)
                queue += self.strategy.on_message(act.site, c.advert(), 0.0)
            elif isinstance(act, Relay):
                if act.site in self.gone:
                    continue
                c, msg = self.clients[act.site], act.message
                if isinstance(msg, SecAggRoster):
                    queue += self.strategy.on_message(act.site, c.on_roster(msg), 0.0)
                elif isinstance(msg, SecAggShares):
                    c.on_shares(msg)
                elif isinstance(msg, SecAggUnmask):
                    queue += self.strategy.on_message(act.site, c.on_unmask(msg), 0.0)
            else:
                self.out.append(act)

    def send(self, site: str, value: float, now: float = 1.0) -> None:
        c = self.clients[site]
        arrays = [np.full((2,), value, np.float32), np.full((3, 2), value, np.float32)]  # b, w: sorted names
        words = c.mask(c.encode(arrays, 1.0))
        params = {"secagg": torch.from_numpy(words.view(np.int32))}
        update = Update(site, self.tasks[site], 0, params, "FULL", 1.0, {})
        self.take(self.strategy.on_update(update, now))


def start(threshold: int = 3, **kwargs: object) -> Federation:
    config = SecAggConfig(threshold=threshold)
    strategy = SecureFedAvg(min_clients=2, num_rounds=1, secure_aggregation=config.to_dict(), **kwargs)  # type: ignore[arg-type]
    fed = Federation(strategy, config)
    fed.take(strategy.start(MODEL, SITES, 0.0))
    return fed


def published(fed: Federation) -> Publish:
    (pub,) = [a for a in fed.out if isinstance(a, Publish)]
    return pub


def test_the_mean_of_the_sites_that_stayed_when_one_drops_after_the_shares() -> None:
    fed = start()
    assert fed.strategy.state()["secagg_phase"] == "collect"  # keys and shares went round as the tasks went out
    for site, value in (("a", 1.0), ("b", 2.0), ("c", 4.0)):
        fed.send(site, value)
    fed.gone.add("d")
    fed.take(fed.strategy.task_failed("d", fed.tasks["d"], "script crashed", 2.0))
    pub = published(fed)
    assert torch.allclose(pub.model["w"], torch.full((3, 2), 7 / 3), atol=1e-6)
    assert torch.allclose(pub.model["b"], torch.full((2,), 7 / 3), atol=1e-6)
    assert torch.equal(pub.model["n"], MODEL["n"])  # integer tensors: the global's
    assert any(isinstance(a, Finished) for a in fed.out)
    assert [a.site for a in fed.out if isinstance(a, Accepted)] == ["a", "b", "c"]


def test_below_the_threshold_the_round_fails_and_reveals_nothing() -> None:
    fed = start()
    fed.send("a", 1.0)
    fed.send("b", 2.0)
    for site in ("c", "d"):
        fed.gone.add(site)
        fed.take(fed.strategy.site_left(site, 2.0))
    (failed,) = [a for a in fed.out if isinstance(a, Failed)]
    assert "2 masked inputs arrived, threshold 3" in failed.reason and "no sum is revealed" in failed.reason
    assert not any(isinstance(a, Publish) for a in fed.out)
    assert not any(isinstance(a, Relay) and isinstance(a.message, SecAggUnmask) for a in fed.out)


def test_survivors_gone_before_they_reveal_fail_the_round() -> None:
    fed = start(round_timeout=10.0)
    fed.gone |= {"b", "c"}  # their inputs arrive, but they never answer the unmask request
    for site, value in (("a", 1.0), ("b", 2.0), ("c", 4.0), ("d", 3.0)):
        fed.send(site, value)
    assert fed.strategy.state()["secagg_phase"] == "unmask"
    fed.take(fed.strategy.site_left("b", 3.0))
    fed.take(fed.strategy.tick(20.0))
    (failed,) = [a for a in fed.out if isinstance(a, Failed)]
    assert "round timeout" in failed.reason and "no sum is revealed" in failed.reason


def test_an_input_from_a_site_outside_the_round_is_rejected() -> None:
    fed = start()
    words = np.zeros(9, np.uint32)
    update = Update("zz", "nope", 0, {"secagg": torch.from_numpy(words.view(np.int32))}, "FULL", 1.0, {})
    acts = fed.strategy.on_update(update, 1.0)
    assert not any(isinstance(a, Accepted) for a in acts)


def test_threshold_above_the_dispatched_sites_fails_at_once() -> None:
    config = SecAggConfig(threshold=5)
    strategy = SecureFedAvg(min_clients=2, num_rounds=1, secure_aggregation=config.to_dict())
    acts = strategy.start(MODEL, SITES, 0.0)
    (failed,) = [a for a in acts if isinstance(a, Failed)]
    assert "4 sites dispatched, secure_aggregation.threshold=5" in failed.reason


def test_only_fedavg_takes_the_option() -> None:
    assert isinstance(
        make_strategy("fedavg", min_clients=2, num_rounds=1, secure_aggregation={"threshold": 2}), SecureFedAvg
    )
    with pytest.raises(ConfigError, match="fedavg strategy only"):
        make_strategy("fedbuff", buffer_size=2, num_versions=1, secure_aggregation={"threshold": 2})
    with pytest.raises(ConfigError, match="threshold must be an integer"):
        make_strategy("fedavg", min_clients=2, num_rounds=1, secure_aggregation={"threshold": "3"})


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("{threshold = 1}", "threshold must be an integer >= 2"),
        ("{threshold = 3, clipp = 2.0}", "unknown keys \\['clipp'\\]"),
        ("{threshold = 5}", "max = 4 is below \\[strategy\\] secure_aggregation threshold = 5"),
        ('"yes"', "must be a table"),
    ],
)
def test_job_toml_errors_name_the_option(option: str, message: str) -> None:
    from fedbus.jobs import parse_job_toml

    text = (
        'name = "j"\nmodel = "m.safetensors"\n[strategy]\nname = "fedavg"\nmin_clients = 2\nnum_rounds = 1\n'
        f'secure_aggregation = {option}\n[script]\npath = "c.py"\n[sites]\nmin = 2\nmax = 4\n'
    )
    with pytest.raises(ConfigError, match=message):
        parse_job_toml(text, "job.toml")
