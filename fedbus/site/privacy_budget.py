"""The site's differential-privacy budget: the epsilon its Gaussian filter has spent, per job, and the refusal
of an update that would spend more than the site allows.

What is accounted. Every update the site's DP filter (``filters.GaussianDP``) releases is one Gaussian
mechanism applied to the site's clipped update Δ (L2 norm ≤ C): Δ + N(0, (σ_std)²) per element, with noise
multiplier σ = σ_std / C (the site's ``dp_sigma``, since the filter's noise is ``dp_sigma`` x ``dp_clip``) and
sampling rate 1: the site's whole contribution is in every release. The guarantee is site-level (user-level)
DP of the sequence of released updates under add/remove adjacency of the site's contribution (its update
against no update: L2 sensitivity C), whatever the broker does with them afterwards (aggregation, publication,
staleness weighting are post-processing). Under replace-one adjacency (the site's data swapped for any other)
the sensitivity is 2C: the same releases give the guarantee of noise multiplier σ/2. It is not example-level
DP-SGD: that is the training script's business (Opacus in the script, its own accountant).

Releases compose adaptively (each global model depends on earlier releases); the RDP accountant
(Mironov 2017) and the PRV accountant (Gopi, Lee, Wutschitz 2021), both from Opacus, account for that. A
release is accounted when it is decided, before any byte of it leaves the site: an upload that is lost on the
way still counts (its noisy update may have been seen). Resuming an interrupted upload sends the same bytes
again, which spends nothing more.

Persistence: ``WORKSPACE/privacy/JOB.json`` holds the job's mechanism history (``[sigma, q, count]`` runs),
written atomically (temporary file, fsync, rename) before the release; a restarted site continues from it.
Epsilon is recomputed from the history for the configured delta, so changing ``dp_delta`` between runs is
honest. Every release is also an audit record (``privacy_spent``), every refusal one (``privacy_refused``).
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedbus.config import SiteConfig, is_safe_name
from fedbus.errors import ConfigError, JobError

ACCOUNTANTS = ("rdp", "prv")
History = list[tuple[float, float, int]]
"""Runs of identical mechanisms, as Opacus keeps them: (noise multiplier, sampling rate, count)."""


class PrivacyBudgetSpent(JobError):
    """An update refused because releasing it would spend more than the site's ``dp_max_epsilon``."""


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """The epsilon, for ``delta``, of composing the mechanisms of ``history`` (Opacus's RDP or PRV accountant)."""
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"dp_accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    if not history:
        return 0.0
    acc = _accountant_class(accountant)()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():
        # PRV at sampling rate 1 takes log(0) on the empty side of its domain (numpy warns, the result is exact);
        # RDP warns when the best order is the largest one tried: the bound is then loose, still an upper bound
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", "Optimal order is the largest alpha", UserWarning)
        if accountant == "rdp":
            return float(acc.get_epsilon(delta=delta, alphas=RDP_ORDERS))
        return float(acc.get_epsilon(delta=delta))


RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 257)) + [320, 384, 512, 768, 1024, 2048, 4096]
"""The Rényi orders tried: Opacus's defaults (1.1 to 63) and more, since with sampling rate 1 and a large noise
multiplier the best order lies far above 63 (e.g. sigma 20, one release: about 96)."""


def _accountant_class(accountant: str) -> Any:
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant
    except ImportError as exc:
        raise ConfigError("the privacy budget (dp_delta) needs opacus: pip install 'fedbus[privacy]'") from exc
    return RDPAccountant if accountant == "rdp" else PRVAccountant


def compose(history: History, noise_multiplier: float, sample_rate: float = 1.0) -> History:
    """``history`` with one more mechanism (runs of the same one are merged, as Opacus does)."""
    out = list(history)
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        out[-1] = (noise_multiplier, sample_rate, out[-1][2] + 1)
    else:
        out.append((noise_multiplier, sample_rate, 1))
    return out


class PrivacyBudget:
    """The site's per-job ledger of DP releases; ``spend`` is called by the site's DP filter for every release."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        delta: float,
        max_epsilon: float | None = None,
        accountant: str = "rdp",
        site: str = "",
        audit: Any = None,
    ) -> None:
        if not 0 < delta < 1:
            raise ConfigError(f"dp_delta must be within (0, 1), got {delta!r}")
        if max_epsilon is not None and not max_epsilon > 0:
            raise ConfigError(f"dp_max_epsilon must be > 0, got {max_epsilon!r}")
        if accountant not in ACCOUNTANTS:
            raise ConfigError(f"dp_accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
        _accountant_class(accountant)  # a site without opacus fails at start, not at its first update
        self.folder = Path(folder)
        self.delta, self.max_epsilon, self.accountant = float(delta), max_epsilon, accountant
        self.site, self.audit = site, audit
        self._lock = threading.Lock()  # filters run in worker threads; two uploads of a job must not race
        self._reports: dict[tuple[str, str], dict[str, float]] = {}

    @classmethod
    def from_config(
        cls, config: SiteConfig, workspace: str | os.PathLike[str], audit: Any = None
    ) -> PrivacyBudget | None:
        """The budget a site config asks for (``dp_delta`` turns accounting on), or None."""
        if config.dp_delta is None:
            return None
        return cls(
            Path(workspace) / "privacy",
            delta=config.dp_delta,
            max_epsilon=config.dp_max_epsilon,
            accountant=config.dp_accountant,
            site=config.name,
            audit=audit,
        )

    def _path(self, job_id: str) -> Path:
        if not is_safe_name(job_id):
            raise JobError(f"cannot account for job {job_id[:80]!r}: not a job id")
        return self.folder / f"{job_id}.json"

    def history(self, job_id: str) -> History:
        """The mechanisms released for ``job_id`` so far (empty for a job this site never released for)."""
        path = self._path(job_id)
        try:
            doc = json.loads(path.read_bytes())
            return [(float(s), float(q), int(n)) for s, q, n in doc["history"]]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # refusing is the safe side: a ledger we cannot read must not read as "nothing spent"
            raise JobError(f"{path}: unreadable privacy ledger ({exc}); fix or remove it to go on") from exc

    def spent(self, job_id: str) -> float:
        """The epsilon (for this budget's delta) the site has spent on ``job_id``."""
        return epsilon_of(self.history(job_id), self.delta, self.accountant)

    def spend(self, job_id: str, task_id: str, noise_multiplier: float, sample_rate: float = 1.0) -> float:
        """Account one release; returns the job's epsilon after it. Raises PrivacyBudgetSpent (nothing is
        recorded as spent) when it would exceed ``max_epsilon``."""
        with self._lock:
            before = self.history(job_id)
            after = compose(before, noise_multiplier, sample_rate)
            eps = epsilon_of(after, self.delta, self.accountant)
            releases = sum(n for _, _, n in after)
            if self.max_epsilon is not None and eps > self.max_epsilon:
                spent = epsilon_of(before, self.delta, self.accountant)
                reason = (
                    f"privacy budget of site {self.site!r} for job {job_id!r} exhausted: releasing this update "
                    f"would spend epsilon {eps:.4g} > dp_max_epsilon {self.max_epsilon:g} (delta {self.delta:g}, "
                    f"{releases - 1} updates released, epsilon {spent:.4g} spent)"
                )
                self._record("privacy_refused", job_id, task_id, epsilon=round(spent, 6), reason=reason)
                raise PrivacyBudgetSpent(reason)
            self._write(job_id, after, eps)
            self._record("privacy_spent", job_id, task_id, epsilon=round(eps, 6), releases=releases)
            self._reports[(job_id, task_id)] = {"privacy/epsilon": eps, "privacy/delta": self.delta}
            return eps

    def report(self, job_id: str, task_id: str) -> dict[str, float]:
        """The metrics of a task's release (``privacy/epsilon``, ``privacy/delta``), once: for its result."""
        with self._lock:
            return self._reports.pop((job_id, task_id), {})

    def _record(self, kind: str, job_id: str, task_id: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.record(
                kind,
                job=job_id,
                task=task_id,
                site=self.site,
                delta=self.delta,
                max_epsilon=self.max_epsilon,
                accountant=self.accountant,
                **fields,
            )

    def _write(self, job_id: str, history: History, eps: float) -> None:
        path = self._path(job_id)
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        doc = {"job": job_id, "history": [list(h) for h in history], "epsilon": eps, "delta": self.delta}
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(doc).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # the ledger is whole, old or new, whenever the site dies
