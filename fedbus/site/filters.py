"""Privacy filters: the site's last word on what leaves it.

A filter takes the script's params (name -> CPU tensor) and returns the params to upload. Filters run at
the site, after the script and before the stream. Two sources, in this order:

1. the job's own request (``[extra.privacy]`` in job.toml: ``dp_clip``, ``dp_sigma``, ``exclude``), and
2. the site's filters (``dp_clip``, ``dp_sigma``, ``exclude_vars`` in the site config, or ``filters=`` of
   ``Site``), which run last and always: the site operator installs them, a job cannot remove or weaken
   them (it can only add its own before them).

Filters must not modify their input in place (it may be a view of the script's file); they return new
tensors. To add one, subclass :class:`PrivacyFilter` (it gets a :class:`FilterContext`: the task's global
model, so that a filter can work on the update rather than the weights), or pass any plain callable
``params -> params``.

Differential privacy (the Gaussian mechanism on the update): the update Δ (the params themselves for a
DIFF result, params − global model for a FULL one) is scaled to L2 norm at most C over all its floating
tensors together, then N(0, (σ·C)²) noise is added to every element; a FULL result is sent as global + Δ'.
Integer tensors (counters such as ``num_batches_tracked``) are passed unchanged.

Privacy budget: the site's DP filter may carry a :class:`~fedbus.site.privacy_budget.PrivacyBudget` (the site
config's ``dp_delta``, ``dp_max_epsilon``). Each update it releases is then accounted as one Gaussian mechanism
with noise multiplier σ and sampling rate 1 (site-level DP of the released updates; see that module), before
the noise is drawn; an update that would exceed the budget is refused (``PrivacyBudgetSpent``, a JobError) and
nothing leaves. The epsilon after a release goes into the result's metrics (``filter_metrics``).

Exclude-variables: the named tensors never leave the site. The broker checks every update against the
global model's names, so an excluded tensor is not dropped but replaced by what the broker already has:
the global model's own values (FULL) or zeros (DIFF). Names match exactly or as ``fnmatch`` patterns.
"""

from __future__ import annotations

import abc
import fnmatch
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedbus.config import SiteConfig
from fedbus.errors import ConfigError, JobError
from fedbus.he.options import KEYS as HE_KEYS
from fedbus.he.options import HEOptions, he_options
from fedbus.site.privacy_budget import PrivacyBudget

Params = dict[str, torch.Tensor]
Filter = Callable[..., Params]


@dataclass(frozen=True)
class FilterContext:
    """What a filter may know about the update it filters."""

    job_id: str = ""
    task_id: str = ""
    params_type: str = "FULL"
    base: Mapping[str, torch.Tensor] | None = None
    """The global model the task was trained from (None when the site has none, e.g. a task without model)."""


class PrivacyFilter(abc.ABC):
    """Base of filters that want the context; ``name`` is what the audit trail records."""

    name = "filter"

    @abc.abstractmethod
    def __call__(self, params: Params, ctx: FilterContext) -> Params:
        """The params to upload instead of ``params`` (new tensors: the input may be a view of the script's file)."""

    def __repr__(self) -> str:
        return self.name


class ExcludeVars(PrivacyFilter):
    """Named tensors never leave the site: replaced by the global model's values (FULL) or zeros (DIFF)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
            raise ConfigError("exclude: a list of tensor names or fnmatch patterns")
        self.patterns = tuple(patterns)
        self.name = f"exclude({','.join(self.patterns)})"

    def matches(self, name: str) -> bool:
        return any(name == p or fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def __call__(self, params: Params, ctx: FilterContext) -> Params:
        out = dict(params)
        for name, t in params.items():
            if not self.matches(name):
                continue
            base = ctx.base.get(name) if ctx.base is not None and ctx.params_type == "FULL" else None
            if ctx.params_type == "FULL" and base is None:
                raise JobError(f"cannot exclude {name!r}: the site has no global value to send in its place")
            out[name] = base.to(t.dtype).clone() if base is not None else torch.zeros_like(t)
        return out


class GaussianDP(PrivacyFilter):
    """Clip the update to L2 norm ``clip`` (C), then add Gaussian noise of standard deviation ``sigma`` x C.

    With a ``budget``, every call is one release of the Gaussian mechanism with noise multiplier ``sigma``
    (the noise's standard deviation over the clip norm) and sampling rate 1, accounted for the context's job
    before the noise is drawn; past the budget the call raises ``PrivacyBudgetSpent`` instead."""

    def __init__(
        self,
        clip: float,
        sigma: float = 0.0,
        *,
        generator: torch.Generator | None = None,
        budget: PrivacyBudget | None = None,
    ) -> None:
        if not (isinstance(clip, int | float) and clip > 0):
            raise ConfigError(f"dp_clip must be a number > 0, got {clip!r}")
        if not (isinstance(sigma, int | float) and sigma >= 0):
            raise ConfigError(f"dp_sigma must be a number >= 0, got {sigma!r}")
        if budget is not None and sigma <= 0:
            raise ConfigError("a privacy budget (dp_delta) needs dp_sigma > 0: without noise epsilon is infinite")
        self.clip, self.sigma = float(clip), float(sigma)
        self.budget = budget
        self.name = f"dp(clip={self.clip:g},sigma={self.sigma:g})"
        self.generator = generator
        if generator is None:
            self.generator = torch.Generator().manual_seed(secrets.randbits(63))

    def __call__(self, params: Params, ctx: FilterContext) -> Params:
        full = ctx.params_type == "FULL"
        if full and ctx.base is None:
            raise JobError("differential privacy on FULL params needs the task's global model")
        if self.budget is not None:  # accounted (or refused) before anything is computed from the update
            self.budget.spend(ctx.job_id, ctx.task_id, self.sigma)
        base = ctx.base or {}
        floats = [n for n, t in params.items() if t.is_floating_point()]

        def delta(n: str) -> torch.Tensor:  # computed twice rather than kept: memory stays one tensor
            return params[n] - base[n].to(params[n].dtype) if full else params[n]

        sq = sum(float(torch.linalg.vector_norm(delta(n), dtype=torch.float64)) ** 2 for n in floats)
        scale = min(1.0, self.clip / max(sq**0.5, 1e-12))
        std = self.sigma * self.clip
        out = dict(params)
        for n in floats:
            d = delta(n) * scale
            if std > 0:
                d += torch.randn(d.shape, generator=self.generator, dtype=d.dtype) * std
            out[n] = d + base[n].to(d.dtype) if full else d
        return out


class SecAggMask(PrivacyFilter):
    """Secure aggregation's masking step, always the last: the update (its floating tensors, in sorted-name
    order) becomes one vector ``secagg`` of ring words, fixed-point encoded with the weight and masked for the
    round (``fedbus.secagg``). What leaves the site is indistinguishable from random words; only the sum of the
    round's vectors, unmasked with the survivors' help, means anything. Integer tensors stay at the site."""

    name = "secagg"

    def __init__(self, client: Any, weight: float) -> None:
        self.client = client  # the round's fedbus.secagg.protocol.SecAggClient, its shares in
        self.weight = float(weight)

    def __call__(self, params: Params, ctx: FilterContext) -> Params:
        import numpy as np

        from fedbus.secagg.encoding import float_names

        names = float_names(params)
        if not names:
            raise JobError("secure aggregation: the update has no floating tensor to send")
        arrays = [
            params[n].detach().cpu().to(torch.float64 if params[n].dtype == torch.float64 else torch.float32).numpy()
            for n in names
        ]
        words = self.client.mask(self.client.encode(arrays, self.weight))
        signed = words.view(np.int32 if words.dtype == np.uint32 else np.int64)
        return {"secagg": torch.from_numpy(signed)}


def make_filters(
    *,
    dp_clip: float | None,
    dp_sigma: float | None,
    exclude: Sequence[str] = (),
    budget: PrivacyBudget | None = None,
) -> list[PrivacyFilter]:
    """The filters a config asks for: exclude first (excluded tensors carry no update), then DP (accounted
    against ``budget`` when there is one: the site's own filters only, a job's request is its own business)."""
    out: list[PrivacyFilter] = []
    if exclude:
        out.append(ExcludeVars(exclude))
    if dp_clip is not None:
        out.append(GaussianDP(dp_clip, dp_sigma or 0.0, budget=budget))
    elif dp_sigma is not None:
        raise ConfigError("dp_sigma needs dp_clip (the noise is sigma x clip)")
    elif budget is not None:
        raise ConfigError("a privacy budget (dp_delta) needs dp_clip and dp_sigma: it accounts their noise")
    return out


def site_filters(config: SiteConfig, workspace: str | os.PathLike[str], audit: Any = None) -> list[PrivacyFilter]:
    """The filters a site config imposes, its DP filter accounted against the site's privacy budget (if any):
    ``WORKSPACE/privacy/``, releases and refusals written to ``audit``."""
    budget = PrivacyBudget.from_config(config, workspace, audit)
    return make_filters(dp_clip=config.dp_clip, dp_sigma=config.dp_sigma, exclude=config.exclude_vars, budget=budget)


def job_filters(extra: Mapping[str, Any]) -> list[PrivacyFilter]:
    """The filters a job asks for in ``[extra.privacy]``; ConfigError for a malformed request."""
    privacy = extra.get("privacy", {})
    if not isinstance(privacy, Mapping):
        raise ConfigError("job.toml [extra.privacy] must be a table")
    known = ("dp_clip", "dp_sigma", "exclude", *HE_KEYS)  # he, he_plaintext: ``he_filter``
    unknown = set(privacy) - set(known)
    if unknown:
        raise ConfigError(f"job.toml [extra.privacy]: unknown keys {sorted(unknown)} ({', '.join(known)})")
    exclude = privacy.get("exclude", ())
    if not isinstance(exclude, list | tuple):
        raise ConfigError("job.toml [extra.privacy] exclude must be a list of names")
    return make_filters(dp_clip=privacy.get("dp_clip"), dp_sigma=privacy.get("dp_sigma"), exclude=exclude)


def filter_metrics(filters: Sequence[Filter], job_id: str, task_id: str) -> dict[str, float]:
    """What the filters report about a task's release, for its result's metrics: ``privacy/epsilon`` (the
    job's epsilon at this site after the release) and ``privacy/delta`` from an accounted DP filter."""
    out: dict[str, float] = {}
    for f in filters:
        if isinstance(f, GaussianDP) and f.budget is not None:
            out.update(f.budget.report(job_id, task_id))
    return out


def filter_name(f: Filter) -> str:
    return f.name if isinstance(f, PrivacyFilter) else getattr(f, "__qualname__", repr(f))


def apply_filters(filters: Sequence[Filter], params: Params, ctx: FilterContext | None = None) -> Params:
    """Run ``params`` through every filter in order; a filter returning garbage is a JobError naming it."""
    ctx = ctx or FilterContext()
    for f in filters:
        out = f(params, ctx) if isinstance(f, PrivacyFilter) else f(params)
        if not isinstance(out, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in out.items()
        ):
            raise JobError(f"privacy filter {filter_name(f)} must return a dict of name -> tensor")
        params = dict(out)
    return params


class HEEncrypt(PrivacyFilter):
    """Homomorphic encryption (CKKS) of every floating tensor the job does not list in ``he_plaintext``: the
    broker can fold the update with public weights but not read it. It runs after every other filter (the
    runner puts it last): DP noise is added to the plaintext, then the result is encrypted. The same context
    decrypts the global models the broker sends (``decrypt_file``), before the script sees them."""

    name = "he(ckks)"

    def __init__(self, context: Any, options: HEOptions) -> None:
        self.context = context
        self.options = options

    def __call__(self, params: Params, ctx: FilterContext) -> Params:
        from fedbus.he.codec import encrypt_params

        return encrypt_params(self.context, params, self.options)

    def decrypt_file(self, path: str | os.PathLike[str], max_total: int) -> bool:
        """Decrypt a received model file in place; False when it held no ciphertext (a plaintext version)."""
        from fedbus.he.codec import decrypt_file

        return decrypt_file(self.context, path, max_total=max_total)


def he_filter(extra: Mapping[str, Any], context_path: str | None) -> HEEncrypt | None:
    """The job's encryption filter when it asks for one (``[extra.privacy] he = true``), with the site's secret
    context (``he_context`` in the site config); JobError when the site has none: it cannot take the job."""
    options = he_options(extra)
    if options is None:
        return None
    if context_path is None:
        raise JobError(
            "the job asks for homomorphic encryption ([extra.privacy] he = true) but this site has no he_context: "
            "provision the project with he = true and set he_context in the site's config"
        )
    from fedbus.he.context import load_site_context

    return HEEncrypt(load_site_context(context_path), options)
