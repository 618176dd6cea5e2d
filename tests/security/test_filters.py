"""Privacy filters at the site: differential privacy (clip + Gaussian noise) and exclude-variables."""

from __future__ import annotations

import math

import pytest
import torch

from fedbus.errors import ConfigError, JobError
from fedbus.site.filters import ExcludeVars, FilterContext, GaussianDP, apply_filters, job_filters, make_filters


def _model(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g) * scale,
        "fc.weight": torch.randn(10, 64, generator=g) * scale,
        "fc.bias": torch.randn(10, generator=g) * scale,
        "bn.num_batches_tracked": torch.tensor(7),
    }


def _norm(params: dict[str, torch.Tensor], base: dict[str, torch.Tensor] | None = None) -> float:
    sq = 0.0
    for n, t in params.items():
        if t.is_floating_point():
            d = t.double() - (base[n].double() if base is not None else 0.0)
            sq += float((d * d).sum())
    return math.sqrt(sq)


@pytest.mark.parametrize("clip", [0.01, 0.5, 3.0, 1e6])
@pytest.mark.parametrize("params_type", ["DIFF", "FULL"])
def test_clipping_bounds_the_update_norm(clip: float, params_type: str) -> None:
    base = _model(1)
    params = _model(2, scale=5.0)
    ctx = FilterContext(params_type=params_type, base=base)
    before = dict(params)
    out = GaussianDP(clip, sigma=0.0)(params, ctx)
    ref = base if params_type == "FULL" else None
    norm_in, norm_out = _norm(params, ref), _norm(out, ref)
    assert norm_out <= clip * (1 + 1e-5)
    if norm_in > clip:  # clipped to exactly C, direction kept
        assert norm_out == pytest.approx(clip, rel=1e-4)
    else:  # left alone
        assert norm_out == pytest.approx(norm_in, rel=1e-6)
    assert torch.equal(out["bn.num_batches_tracked"], params["bn.num_batches_tracked"])  # integers pass
    assert all(before[k] is params[k] for k in params)  # the input is not modified
    assert all(out[k].dtype == params[k].dtype and out[k].shape == params[k].shape for k in params)


def test_noise_standard_deviation_is_sigma_times_clip() -> None:
    """Over many draws (64k elements x 8 updates) the added noise has mean 0 and std sigma x C: the sample
    std of 524,288 normal draws is within 0.5% of the true one with overwhelming probability (its relative
    standard error is 1/sqrt(2n) = 0.1%)."""
    clip, sigma = 2.0, 0.7
    zero = {"w": torch.zeros(65536)}
    dp = GaussianDP(clip, sigma, generator=torch.Generator().manual_seed(5))
    draws = torch.cat([dp(zero, FilterContext(params_type="DIFF"))["w"] for _ in range(8)])
    assert float(draws.std()) == pytest.approx(sigma * clip, rel=0.005)
    assert abs(float(draws.mean())) < 5 * sigma * clip / math.sqrt(draws.numel())
    # and on a FULL update: noise around the clipped update, not around the weights
    base = {"w": torch.full((65536,), 3.0)}
    full = dp({"w": torch.full((65536,), 3.0)}, FilterContext(params_type="FULL", base=base))["w"] - 3.0
    assert float(full.std()) == pytest.approx(sigma * clip, rel=0.02)


def test_exclude_replaces_named_tensors_by_what_the_broker_has() -> None:
    base, params = _model(1), _model(2)
    f = ExcludeVars(["fc.*"])
    full = f(params, FilterContext(params_type="FULL", base=base))
    assert torch.equal(full["fc.weight"], base["fc.weight"]) and torch.equal(full["fc.bias"], base["fc.bias"])
    assert torch.equal(full["conv.weight"], params["conv.weight"])
    diff = f(params, FilterContext(params_type="DIFF"))
    assert not diff["fc.weight"].any() and torch.equal(diff["conv.weight"], params["conv.weight"])
    with pytest.raises(JobError, match="no global value"):
        f(params, FilterContext(params_type="FULL", base=None))


def test_job_filters_come_from_extra_privacy_and_site_filters_run_last() -> None:
    job = job_filters({"privacy": {"dp_clip": 1.0, "exclude": ["fc.bias"]}})
    site = make_filters(dp_clip=0.1, dp_sigma=None, exclude=())
    base, params = _model(1), _model(2, scale=4.0)
    out = apply_filters([*job, *site], params, FilterContext(params_type="FULL", base=base))
    assert _norm(out, base) <= 0.1 * (1 + 1e-5)  # the site's tighter clip holds whatever the job asked
    assert torch.equal(out["fc.bias"], base["fc.bias"])
    for bad in ({"privacy": {"dp_sigma": 1.0}}, {"privacy": {"epsilon": 1}}, {"privacy": {"exclude": "fc"}}):
        with pytest.raises(ConfigError):
            job_filters(bad)


def test_plain_callables_still_work_and_garbage_is_refused() -> None:
    params = _model(1)
    assert apply_filters([lambda p: {k: v * 0 for k, v in p.items()}], params)["fc.bias"].abs().sum() == 0
    with pytest.raises(JobError, match="must return a dict"):
        apply_filters([lambda p: None], params)
