"""The secure-aggregation round without sockets: sites and broker joined by a loop that carries messages."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cryptography", reason="secure aggregation needs the secagg extra (cryptography)")

from fedbus.errors import ConfigError, RemoteProtocolError
from fedbus.protocol.messages import SecAggRoster, SecAggShares, SecAggUnmask
from fedbus.secagg import encoding, prg, shamir
from fedbus.secagg.config import SecAggConfig
from fedbus.secagg.protocol import Outcome, SecAggClient, SecAggServer

SITES = ["a", "b", "c", "d", "e"]


def deliver(out: Outcome, clients: dict[str, SecAggClient], server: SecAggServer, gone: set[str]) -> Outcome:
    """Carry the server's messages to the clients and their answers back, until nothing is left to carry."""
    pending = list(out.send)
    last = out
    while pending:
        site, msg = pending.pop(0)
        if site in gone:
            continue
        c = clients[site]
        if isinstance(msg, SecAggRoster):
            last = server.on_shares(site, c.on_roster(msg))
        elif isinstance(msg, SecAggShares):
            c.on_shares(msg)
            continue
        elif isinstance(msg, SecAggUnmask):
            last = server.on_reveal(site, c.on_unmask(msg))
        pending += last.send
        if last.failed:
            return last
    return last


def run_round(
    inputs: dict[str, list[np.ndarray]],
    config: SecAggConfig,
    *,
    drop_before_shares: set[str] = frozenset(),  # type: ignore[assignment]
    drop_after_shares: set[str] = frozenset(),  # type: ignore[assignment]
    drop_after_input: set[str] = frozenset(),  # type: ignore[assignment]
    weights: dict[str, float] | None = None,
) -> tuple[SecAggServer, Outcome]:
    names = sorted(inputs)
    server = SecAggServer(config, 1, names)
    clients = {s: SecAggClient(s, config, 1) for s in names}
    gone: set[str] = set(drop_before_shares)
    out = Outcome()
    for s in names:
        out = server.drop(s) if s in drop_before_shares else server.on_advert(s, clients[s].advert())
    out = deliver(out, clients, server, gone)
    if out.failed:
        return server, out
    for s in drop_after_shares:
        gone.add(s)
        server.drop(s)
    for s in names:
        if s in gone:
            continue
        vec = clients[s].mask(clients[s].encode(inputs[s], (weights or {}).get(s, 1.0)))
        if s in drop_after_input:  # its input never arrives at the broker
            continue
        server.add_masked(s, vec)
    for s in drop_after_input:
        gone.add(s)
        server.drop(s)
    out = deliver(server.start_unmask(), clients, server, gone)
    return server, out


def inputs_for(names: list[str], seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {s: [rng.normal(size=(7, 3)).astype(np.float32), rng.normal(size=5).astype(np.float32)] for s in names}


def plain_mean(inputs: dict[str, list[np.ndarray]], sites: list[str]) -> np.ndarray:
    flat = [np.concatenate([a.reshape(-1).astype(np.float64) for a in inputs[s]]) for s in sites]
    return np.mean(flat, axis=0)


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("dropped", [0, 1, 2])  # threshold 3 of 5: up to two may drop
def test_sum_is_exact_within_the_precision_with_dropouts(bits: int, dropped: int) -> None:
    config = SecAggConfig(threshold=3, clip=8.0, bits=bits)
    inputs = inputs_for(SITES)
    late = set(SITES[:dropped])  # masked, shared, but their inputs never arrive
    server, out = run_round(inputs, config, drop_after_input=late)
    assert out.failed is None and server.result is not None
    total, wsum = server.result.values(), server.result.weight
    survivors = [s for s in SITES if s not in late]
    assert sorted(server.survivors) == survivors
    # the stated precision of a sum: half a step per input, and float64's rounding (what limits 64 bits)
    step = len(SITES) / (2 * server.scale) + 16 * np.finfo(np.float64).eps * config.clip * len(SITES)
    assert abs(wsum - len(survivors)) <= step
    assert np.max(np.abs(total / wsum - plain_mean(inputs, survivors))) <= 2 * step


def test_sites_dropping_at_every_step_leave_the_sum_of_the_rest() -> None:
    names = ["s1", "s2", "s3", "s4", "s5", "s6"]
    config = SecAggConfig(threshold=3)
    inputs = inputs_for(names, seed=3)
    server, out = run_round(
        inputs, config, drop_before_shares={"s1"}, drop_after_shares={"s4"}, drop_after_input={"s6"}
    )
    assert out.failed is None and server.result is not None
    assert sorted(server.survivors) == ["s2", "s3", "s5"]
    total, wsum = server.result.values(), server.result.weight
    assert np.allclose(total / wsum, plain_mean(inputs, ["s2", "s3", "s5"]), atol=1e-6)


def test_weights_travel_masked_and_give_the_weighted_mean() -> None:
    config = SecAggConfig(threshold=2, max_weight=100.0)
    names = ["a", "b", "c"]
    inputs = inputs_for(names, seed=5)
    weights = {"a": 10.0, "b": 30.0, "c": 500.0}  # c capped at 100
    server, _out = run_round(inputs, config, weights=weights)
    assert server.result is not None
    total, wsum = server.result.values(), server.result.weight
    w = {"a": 0.1, "b": 0.3, "c": 1.0}
    flat = {s: np.concatenate([a.reshape(-1).astype(np.float64) for a in inputs[s]]) for s in names}
    expected = sum(w[s] * flat[s] for s in names) / sum(w.values())
    assert wsum == pytest.approx(1.4, abs=1e-6)
    assert np.allclose(total / wsum, expected, atol=1e-6)


def test_values_beyond_the_clip_are_clipped() -> None:
    config = SecAggConfig(threshold=2, clip=1.0)
    inputs = {"a": [np.array([5.0, -5.0, 0.25], np.float32)], "b": [np.array([0.5, 0.5, 0.25], np.float32)]}
    server, _ = run_round(inputs, config)
    assert server.result is not None
    assert np.allclose(server.result.values(), [1.5, -0.5, 0.5], atol=1e-6)


@pytest.mark.parametrize("late", [3, 4])
def test_refused_below_the_threshold_no_sum_revealed(late: int) -> None:
    config = SecAggConfig(threshold=3)
    server, out = run_round(inputs_for(SITES), config, drop_after_input=set(SITES[:late]))
    assert out.failed is not None and "threshold 3" in out.failed and "no sum is revealed" in out.failed
    assert server.result is None and server.phase == "failed"


def test_refused_when_too_few_advertise() -> None:
    config = SecAggConfig(threshold=4)
    _server, out = run_round(inputs_for(SITES), config, drop_before_shares={"a", "b"})
    assert out.failed is not None and "3 sites advertised keys, threshold 4" in out.failed


def test_one_masked_input_reveals_nothing_of_the_update() -> None:
    config = SecAggConfig(threshold=2)
    names = ["a", "b", "c"]
    server = SecAggServer(config, 1, names)
    clients = {s: SecAggClient(s, config, 1) for s in names}
    out = Outcome()
    for s in names:
        out = server.on_advert(s, clients[s].advert())
    deliver(out, clients, server, set())
    x = [np.zeros(10_000, np.float32)]  # all zeros: unmasked it would be all zero words
    plain = clients["a"].encode(x, 1.0)
    masked = clients["a"].mask(plain.copy())
    assert not np.array_equal(plain, masked)
    # the masked words look uniform: about half of each bit is set
    bits = np.unpackbits(masked.view(np.uint8))
    assert 0.48 < bits.mean() < 0.52


def test_a_site_reveals_once_and_only_a_split_of_its_holders() -> None:
    config = SecAggConfig(threshold=2)
    names = ["a", "b", "c"]
    server = SecAggServer(config, 1, names)
    clients = {s: SecAggClient(s, config, 1) for s in names}
    out = Outcome()
    for s in names:
        out = server.on_advert(s, clients[s].advert())
    deliver(out, clients, server, set())
    a = clients["a"]
    a.mask(a.encode([np.ones(3, np.float32)], 1.0))
    with pytest.raises(RemoteProtocolError, match="split the share holders"):
        a.on_unmask(SecAggUnmask("", 1, ["a", "b"], []))  # c is neither: refused
    with pytest.raises(RemoteProtocolError, match="split the share holders"):
        a.on_unmask(SecAggUnmask("", 1, ["a", "b", "c"], ["c"]))  # both halves of c: refused
    a.on_unmask(SecAggUnmask("", 1, ["a", "b"], ["c"]))
    with pytest.raises(RemoteProtocolError, match="once per round"):
        a.on_unmask(SecAggUnmask("", 1, ["a", "b", "c"], []))


def test_a_tampered_share_does_not_decrypt() -> None:
    config = SecAggConfig(threshold=2)
    names = ["a", "b", "c"]
    server = SecAggServer(config, 1, names)
    clients = {s: SecAggClient(s, config, 1) for s in names}
    roster = None
    for s in names:
        out = server.on_advert(s, clients[s].advert())
        roster = out.send[0][1] if out.send else roster
    assert isinstance(roster, SecAggRoster)
    shares = {s: clients[s].on_roster(roster) for s in names}
    sealed = bytearray(shares["b"].shares["a"])
    sealed[-1] ^= 1
    with pytest.raises(RemoteProtocolError, match="does not decrypt"):
        clients["a"].on_shares(SecAggShares("", 1, {"b": bytes(sealed), "c": shares["c"].shares["a"]}))
    # a share moved to another recipient does not decrypt either: each is bound to sender and recipient
    with pytest.raises(RemoteProtocolError, match="does not decrypt"):
        clients["c"].on_shares(SecAggShares("", 1, {"b": shares["b"].shares["a"]}))


def test_the_roster_must_carry_the_sites_own_keys() -> None:
    config = SecAggConfig(threshold=2)
    a, b = SecAggClient("a", config, 1), SecAggClient("b", config, 1)
    other = SecAggClient("x", config, 1).advert()
    keys = {"a": [other.c_pk, other.s_pk], "b": [b.advert().c_pk, b.advert().s_pk]}
    with pytest.raises(RemoteProtocolError, match="own keys"):
        a.on_roster(SecAggRoster("", 1, keys))
    dup = {"a": [a.advert().c_pk, a.advert().s_pk], "b": [a.advert().c_pk, b.advert().s_pk]}
    with pytest.raises(RemoteProtocolError, match="twice"):
        a.on_roster(SecAggRoster("", 1, dup))


def test_server_refuses_out_of_turn_and_malformed_messages() -> None:
    config = SecAggConfig(threshold=2)
    server = SecAggServer(config, 1, ["a", "b"])
    a = SecAggClient("a", config, 1)
    server.on_advert("a", a.advert())
    with pytest.raises(RemoteProtocolError, match="out of turn"):
        server.on_advert("a", a.advert())
    with pytest.raises(RemoteProtocolError, match="out of turn"):
        server.on_advert("zz", a.advert())
    assert server.refusal("a") is not None  # not collecting yet


def test_shamir_any_threshold_shares_rebuild_fewer_do_not() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, 5)
    assert shamir.combine({1: shares[0], 3: shares[2], 5: shares[4]}, 3) == secret
    assert shamir.combine({2: shares[1], 4: shares[3], 5: shares[4]}, 3) == secret
    with pytest.raises(RemoteProtocolError):
        shamir.combine({1: shares[0], 2: shares[1]}, 3)


def test_prg_blocks_match_one_stream_and_masks_cancel() -> None:
    seed = bytes(32)
    n = 3 * (1 << 20) + 17  # crosses blocks, ends in a partial one
    words = prg.expand(seed, n)
    acc = np.zeros(n, np.uint32)
    prg.add_mask(acc, seed)
    assert np.array_equal(acc, words)
    prg.add_mask(acc, seed, -1)
    assert not acc.any()
    assert np.array_equal(prg.expand(seed, 5), words[:5])
    for name, gen in prg.candidates().items():  # what the bench times fills the array it is given
        out = np.zeros(1000, np.uint32)
        gen(seed, out)
        assert out.any(), name


def test_encoding_round_trips_and_wraps_negatives() -> None:
    scale = encoding.scale_for(32, 8.0, 4)
    assert scale == float((2**31 - 1) // 32)
    vec = encoding.encode([np.array([-1.5, 2.25, 0.0])], 1.0, bits=32, clip=8.0, scale=scale)
    assert vec.dtype == np.uint32 and vec[0] > 2**31  # a negative value, mod 2^32
    assert np.allclose(encoding.decode(vec, scale=scale), [-1.5, 2.25, 0.0, 1.0], atol=1 / scale)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="threshold is required"):
        SecAggConfig.parse({"clip": 1.0})
    with pytest.raises(ConfigError, match="threshold must be an integer >= 2"):
        SecAggConfig.parse({"threshold": 1})
    with pytest.raises(ConfigError, match="bits must be 32 or 64"):
        SecAggConfig.parse({"threshold": 2, "bits": 16})
    with pytest.raises(ConfigError, match="clip must be a number > 0"):
        SecAggConfig.parse({"threshold": 2, "clip": -1})
    with pytest.raises(ConfigError, match="unknown keys \\['treshold'\\]"):
        SecAggConfig.parse({"threshold": 2, "treshold": 3})
    assert SecAggConfig.parse({"threshold": 3, "max_weight": 10}).to_dict() == {
        "threshold": 3,
        "clip": 8.0,
        "bits": 32,
        "max_weight": 10.0,
    }
