"""FedProx: FedAvg's server arithmetic plus fedprox_mu for the clients."""

from __future__ import annotations

import pytest
import torch

from fedbus.errors import ConfigError
from fedbus.strategy import Dispatch, FedAvg, FedProx, Publish, make_strategy

from .helpers import answer, of


def test_client_options_carry_mu_and_the_server_averages_as_fedavg() -> None:
    s = FedProx(min_clients=2, num_rounds=2, fedprox_mu=0.5)
    assert isinstance(s, FedAvg) and s.client_options() == {"fedprox_mu": 0.5}
    d = {x.site: x for x in of(s.start({"w": torch.zeros(2)}, ["a", "b"], now=0.0), Dispatch)}
    s.on_update(answer(d["a"], {"w": torch.tensor([1.0, 2.0])}, weight=1.0), 1.0)
    (pub,) = of(s.on_update(answer(d["b"], {"w": torch.tensor([3.0, 6.0])}, weight=3.0), 2.0), Publish)
    # (1 * [1, 2] + 3 * [3, 6]) / 4 = [2.5, 5.0]
    assert torch.equal(pub.model["w"], torch.tensor([2.5, 5.0]))
    assert s.state()["strategy"] == "fedprox"


def test_mu_zero_is_allowed_and_toml_ints_are_taken() -> None:
    assert FedProx(min_clients=1, num_rounds=1, fedprox_mu=0).client_options() == {"fedprox_mu": 0.0}
    s = make_strategy("fedprox", min_clients=1, num_rounds=1, fedprox_mu=1)
    assert isinstance(s, FedProx) and s.client_options() == {"fedprox_mu": 1.0}


@pytest.mark.parametrize("mu", [-0.1, float("nan"), True, "0.1", None])
def test_bad_mu_is_a_config_error_naming_it(mu: object) -> None:
    with pytest.raises(ConfigError, match="FedProx: fedprox_mu must be"):
        FedProx(min_clients=1, num_rounds=1, fedprox_mu=mu)  # type: ignore[arg-type]


def test_inherited_arguments_are_named_with_the_subclass() -> None:
    with pytest.raises(ConfigError, match="FedProx: min_clients must be an integer >= 1"):
        FedProx(min_clients=0, num_rounds=1)
