"""Homomorphic encryption without IO: blobs, the site's codec, the broker's ciphertext fold and the encrypted
FedAvg and FedBuff, each checked against the plaintext strategy on the same updates (CKKS precision)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedbus.errors import ConfigError
from fedbus.he import blob
from fedbus.he.codec import decrypt_params, encrypt_params
from fedbus.he.fold import CipherFold, plain_spec
from fedbus.he.options import HEOptions, he_options
from fedbus.modelio import serde
from fedbus.strategy import Dispatch, Publish, Rejected, Update, make_strategy
from fedbus.strategy.aggregate import weighted_sum_into
from fedbus.strategy.encrypted import make_encrypted
from tests.privacy.helpers import broker_context, found, site_context, windows

pytestmark = pytest.mark.timeout(60)
ATOL = 1e-4  # CKKS with scale 2**40: errors of about 1e-6 on values of order one
CTX = site_context()
PUB = broker_context(CTX)
OPTS = HEOptions(("bn.*",))


def model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(5000, generator=g),
        "b": torch.randn(3, 7, generator=g, dtype=torch.float64),
        "bn.mean": torch.randn(4, generator=g),
        "steps": torch.tensor(3),
    }


def update(i: int, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return {
        k: torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v + i for k, v in like.items()
    }


def test_a_tensor_round_trips_through_its_blob_within_ckks_precision() -> None:
    m = model()
    enc = encrypt_params(CTX, m, OPTS)
    assert enc["w"].dtype == torch.uint8 and blob.is_blob(enc["w"]) and blob.is_blob(enc["b"])
    assert enc["bn.mean"] is m["bn.mean"] and enc["steps"] is m["steps"]  # plaintext by name, integers always
    dec = decrypt_params(CTX, enc)
    for k, v in m.items():
        assert dec[k].dtype == v.dtype and dec[k].shape == v.shape
        torch.testing.assert_close(dec[k], v, atol=ATOL, rtol=0)
    assert not found(windows(m["w"]), bytes(enc["w"].numpy()))


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda b: b[:100], "does not fit|accounts for|header"),
        (lambda b: torch.cat([b, torch.zeros(8, dtype=torch.uint8)]), "accounts for"),
        (lambda b: torch.zeros_like(b), "no CKKS blob header"),
    ],
)
def test_a_damaged_blob_is_refused_with_a_reason(mutate, why) -> None:  # type: ignore[no-untyped-def]
    enc = encrypt_params(CTX, {"w": torch.randn(100)}, HEOptions())
    with pytest.raises(blob.BlobError, match=why):
        blob.parse(mutate(enc["w"]))


def test_the_fold_matches_the_plaintext_weighted_sum_and_never_holds_an_update() -> None:
    m = model()
    spec = plain_spec(m)
    fold = CipherFold(PUB, spec, frozenset({"w", "b"}))
    plain: dict[str, torch.Tensor] = {}
    updates = [update(i, m) for i in range(3)]
    for i, u in enumerate(updates):
        enc = encrypt_params(CTX, u, OPTS)
        assert fold.check("w", enc["w"]) is None and fold.check("b", enc["b"]) is None
        fold.add(enc, 1.0 + i)
        weighted_sum_into(plain, u, 1.0 + i)
        held = b"".join(fold.held())  # what the fold keeps in memory, serialized
        assert held and not any(found(windows(v[k]), held) for v in updates for k in ("w", "b"))
    got = decrypt_params(CTX, fold.result(0.25))
    torch.testing.assert_close(got["w"], plain["w"] * 0.25, atol=ATOL, rtol=0)
    torch.testing.assert_close(got["b"], plain["b"] * 0.25, atol=ATOL, rtol=0)
    # the control: a plaintext accumulator of one update at weight 1 holds its bytes, and the search finds them
    one: dict[str, torch.Tensor] = {}
    weighted_sum_into(one, updates[0], 1.0)
    assert found(windows(updates[0]["w"]), serde.layout(one).header + one["w"].numpy().tobytes())


def test_a_ciphertext_at_another_scale_is_refused_and_leaves_the_sum_whole() -> None:
    m = model()
    fold = CipherFold(PUB, plain_spec(m), frozenset({"w"}))
    good = encrypt_params(CTX, {"w": m["w"]}, HEOptions())
    fold.add(good, 1.0)
    held = list(fold.held())
    other = site_context()
    other.global_scale = 2.0**30  # the same ring, another scale: its header passes, the sum cannot take it
    foreign = encrypt_params(other, {"w": m["w"]}, HEOptions())
    assert fold.check("w", foreign["w"]) is None
    with pytest.raises(blob.BlobError, match="does not fold with the sum"):
        fold.add(foreign, 1.0)
    assert fold.count == 1 and list(fold.held()) == held


def test_the_fold_refuses_an_update_that_does_not_match() -> None:
    m = model()
    fold = CipherFold(PUB, plain_spec(m), frozenset({"w"}))
    other = encrypt_params(CTX, {"w": torch.randn(4999)}, HEOptions())["w"]
    assert "expected torch.float32 [5000]" in (fold.check("w", other) or "")
    foreign = encrypt_params(site_context(), {"w": m["w"]}, HEOptions())["w"]  # same parameters, another key:
    assert fold.check("w", foreign) is None  # the broker cannot tell (nor can it read either)
    good = encrypt_params(CTX, {"w": m["w"]}, HEOptions())
    bad = {"w": good["w"].clone()}
    bad["w"][-50:] = 7  # the last ciphertext's bytes damaged: the header passes, TenSEAL refuses the ciphertext
    assert fold.check("w", bad["w"]) is None
    for fresh in (True, False):  # into an empty sum, and into one holding an update: nothing of it stays
        with pytest.raises(blob.BlobError, match="'w': ciphertext 1"):
            fold.add(bad, 3.0)
        assert fold.count == (0 if fresh else 1)
        fold.add(good, 1.0) if fresh else None
    torch.testing.assert_close(decrypt_params(CTX, fold.result(1.0))["w"], m["w"], atol=ATOL, rtol=0)


def run(strategy, updates_for, params_type: str, versions: int):  # type: ignore[no-untyped-def]
    """Drive ``strategy`` for ``versions`` versions, every dispatched site answering with ``updates_for``."""
    acts = strategy.start(model(), ["a", "b", "c"], 0.0)
    published = []
    while not strategy.done:
        dispatches = [a for a in acts if isinstance(a, Dispatch)]
        acts = []
        for n, d in enumerate(dispatches):
            if strategy.done:
                break
            params = updates_for(d.site, d.version)
            acts += strategy.on_update(Update(d.site, d.task_id, d.version, params, params_type, weight=n + 1.0), 1.0)
        published += [a for a in acts if isinstance(a, Publish)]
        assert not [a for a in acts if isinstance(a, Rejected)]
    assert len(published) == versions
    return published


@pytest.mark.parametrize(
    ("name", "args", "params_type"),
    [
        ("fedavg", {"min_clients": 3, "num_rounds": 2}, "FULL"),
        ("fedbuff", {"concurrency": 3, "buffer_size": 3, "num_versions": 2, "server_lr": 0.5}, "DIFF"),
        ("fedbuff", {"concurrency": 2, "buffer_size": 1, "num_versions": 3, "staleness": "polynomial"}, "DIFF"),
    ],
)
def test_the_decrypted_global_model_equals_the_plaintext_strategys(name: str, args: dict, params_type: str) -> None:
    plain = make_strategy(name, **args)
    cipher = make_encrypted(name, args, context=PUB, options=OPTS)
    m = model()

    def plain_update(site: str, version: int) -> dict[str, torch.Tensor]:
        return update(ord(site) * 10 + version, m)

    want = run(plain, plain_update, params_type, args.get("num_rounds") or args["num_versions"])
    got = run(
        cipher,
        lambda s, v: encrypt_params(CTX, plain_update(s, v), OPTS),
        params_type,
        len(want),
    )
    for p, c in zip(want, got, strict=True):
        assert c.model["w"].dtype == torch.uint8 and c.model["bn.mean"].dtype == torch.float32
        dec = decrypt_params(CTX, c.model)
        for k, v in p.model.items():
            torch.testing.assert_close(dec[k], v, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("name", "params_type"), [("fedavg", "FULL"), ("fedbuff", "DIFF")])
def test_an_update_with_a_damaged_ciphertext_is_rejected_and_leaves_the_aggregate_alone(
    name: str, params_type: str
) -> None:
    args = (
        {"min_clients": 1, "num_rounds": 1}
        if name == "fedavg"
        else {"concurrency": 3, "buffer_size": 2, "num_versions": 1, "staleness": "constant"}
    )
    s = make_encrypted(name, args, context=PUB, options=OPTS)
    m = model()
    sites = ["a", "b"] if name == "fedavg" else ["a", "b", "c"]
    d1, d2, *rest = [a for a in s.start(m, sites, 0.0) if isinstance(a, Dispatch)]
    bad = encrypt_params(CTX, update(0, m), OPTS)
    bad["b"] = bad["b"].clone()
    bad["b"][-30:] = 1
    acts = s.on_update(Update(d1.site, d1.task_id, 0, bad, params_type), 1.0)
    assert any(isinstance(a, Rejected) and "ciphertext" in a.reason for a in acts)
    acts = s.on_update(Update(d2.site, d2.task_id, 0, encrypt_params(CTX, update(1, m), OPTS), params_type), 1.0)
    if name == "fedbuff":  # the rejected one freed its slot: another site fills the buffer
        d3 = rest[0] if rest else next(a for a in acts if isinstance(a, Dispatch))
        acts += s.on_update(Update(d3.site, d3.task_id, 0, encrypt_params(CTX, update(2, m), OPTS), params_type), 1.0)
    assert any(isinstance(a, Publish) for a in acts)
    got = decrypt_params(CTX, s.model)["b"]
    want = update(1, m)["b"] if name == "fedavg" else m["b"] + (update(1, m)["b"] + update(2, m)["b"]) / 2
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_an_encrypted_fedavg_refuses_diff_results() -> None:
    s = make_encrypted("fedavg", {"min_clients": 1, "num_rounds": 1}, context=PUB, options=OPTS)
    (d,) = s.start(model(), ["a"], 0.0)
    assert isinstance(d, Dispatch)
    acts = s.on_update(Update("a", d.task_id, 0, encrypt_params(CTX, model(), OPTS), "DIFF"), 1.0)
    assert any(isinstance(a, Rejected) and "FULL" in a.reason for a in acts)


def test_a_plaintext_update_is_refused_by_an_encrypted_job() -> None:
    s = make_encrypted("fedavg", {"min_clients": 1, "num_rounds": 1}, context=PUB, options=OPTS)
    (d,) = s.start(model(), ["a"], 0.0)
    acts = s.on_update(Update("a", d.task_id, 0, model(), "FULL"), 1.0)  # type: ignore[union-attr]
    assert any(isinstance(a, Rejected) and "'b'" in a.reason for a in acts)


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ({"server_momentum": 0.9}, "server_momentum"),
        ({"server_optimizer": "adam"}, "server_optimizer"),
        ({"weight_by_samples": True}, "weight_by_samples"),
    ],
)
def test_fedbuff_options_ciphertexts_cannot_honour_are_refused(args: dict, why: str) -> None:
    base = {"concurrency": 2, "buffer_size": 2, "num_versions": 2}
    with pytest.raises(ConfigError, match=why):
        make_encrypted("fedbuff", {**base, **args}, context=None, options=OPTS)


def test_the_job_option_is_checked() -> None:
    assert he_options({}) is None and he_options({"privacy": {"dp_clip": 1.0}}) is None
    assert he_options({"privacy": {"he": True, "he_plaintext": ["bn.*"]}}) == HEOptions(("bn.*",))
    for bad, why in [
        ({"he": "yes"}, "he must be true or false"),
        ({"he": True, "he_plaintext": "bn.*"}, "list of tensor names"),
        ({"he_plaintext": ["x"]}, "needs he = true"),
    ]:
        with pytest.raises(ConfigError, match=why):
            he_options({"privacy": bad})
    with pytest.raises(ConfigError, match="averages with public weights"):
        make_encrypted("scaffold", {}, context=None, options=OPTS)


@pytest.mark.parametrize("name", ["fedavg", "fedbuff"])
def test_a_job_resumes_from_an_encrypted_checkpoint(name: str, tmp_path: Path) -> None:
    """A restarted broker starts the strategy from its last checkpoint: blobs, read back from a safetensors file."""
    args = (
        {"min_clients": 2, "num_rounds": 3}
        if name == "fedavg"
        else {"concurrency": 2, "buffer_size": 2, "num_versions": 3, "staleness": "constant"}
    )
    params_type = "FULL" if name == "fedavg" else "DIFF"
    m = model()
    first = make_encrypted(name, args, context=PUB, options=OPTS)
    acts = first.start(m, ["a", "b"], 0.0)
    for n, d in enumerate(a for a in acts if isinstance(a, Dispatch)):
        first.on_update(Update(d.site, d.task_id, 0, encrypt_params(CTX, update(n, m), OPTS), params_type), 1.0)
    assert first.version == 1
    serde.write_file(tmp_path / "v1.safetensors", serde.layout(dict(first.model)), durable=False)
    restored = serde.read_file(tmp_path / "v1.safetensors")  # the checkpoint, as the launcher reads it back
    assert restored["w"].dtype == torch.uint8
    second = make_encrypted(name, args, context=PUB, options=OPTS)
    acts = second.start(restored, ["a", "b"], 0.0, version=1)
    for n, d in enumerate(a for a in acts if isinstance(a, Dispatch)):
        second.on_update(Update(d.site, d.task_id, 1, encrypt_params(CTX, update(10 + n, m), OPTS), params_type), 1.0)
    assert second.version == 2
    got = decrypt_params(CTX, second.model)
    if name == "fedavg":
        want = (update(10, m)["w"] + update(11, m)["w"]) / 2
    else:
        want = m["w"] + sum(update(i, m)["w"] for i in (0, 1, 10, 11)) / 2
    torch.testing.assert_close(got["w"], want, atol=ATOL, rtol=0)
