"""Privacy accounting: the epsilon a run has spent, from Google's `dp-accounting` (RDP).

Every private release is a Gaussian mechanism, applied to a random subset: a round's
cohort (central, user-level DP) or a DP-SGD step's batch (local, sample-level DP). A
`Release` names one such mechanism, how often it ran, and the share of the protected
units it saw; `epsilon` composes them. The subsampling is Poisson with rate `q` and the
neighbouring relation add-or-remove-one, the convention of DP-SGD (Abadi et al. 2016) and
DP-FedAvg (McMahan et al. 2018). DP-SGD here samples its batches by Poisson draws, as
assumed; fedsim's cohorts are a fixed number of clients drawn without replacement, which
the same analysis treats at `q = cohort / population`, as those papers do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import dp_accounting
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as rdp_module

#: the RDP orders `RdpAccountant` uses by default
RDP_ORDERS = tuple(rdp_module.DEFAULT_RDP_ORDERS)


@dataclass(frozen=True)
class Release:
    """`count` runs of the Gaussian mechanism with `noise_multiplier` (noise std over the
    L2 sensitivity) on a Poisson sample at rate `sample_rate` (1: everyone, every time)."""

    sample_rate: float
    noise_multiplier: float
    count: int


def release_event(release: Release) -> dp_accounting.DpEvent:
    """The `dp-accounting` event of `release` (what `RdpAccountant` composes)."""
    gaussian: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(release.noise_multiplier)
    if release.sample_rate < 1:
        gaussian = dp_accounting.PoissonSampledDpEvent(release.sample_rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(gaussian, release.count)


@lru_cache(maxsize=4096)
def step_rdp(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """The RDP, at `RDP_ORDERS`, of one subsampled Gaussian step: dp-accounting's own
    function, kept per (rate, noise). `RdpAccountant` computes the same anew for each
    composition (0.1 s with its fractional orders); a run accounts every client every
    round, so the value is reused and scaled by the count, as the accountant does."""
    return np.asarray(rdp_module._compute_rdp_poisson_subsampled_gaussian(  # noqa: SLF001
        sample_rate, noise_multiplier, RDP_ORDERS), dtype=float)


def epsilon(releases: Iterable[Release], delta: float) -> float:
    """The (epsilon, `delta`)-DP guarantee of all `releases` together (RDP, composed as
    `RdpAccountant` composes `release_event`s); 0 before any release, inf without noise."""
    releases = [r for r in releases if r.count > 0]
    if not releases:
        return 0.0
    if any(r.noise_multiplier <= 0 for r in releases):
        return float("inf")
    absl = logging.getLogger("absl")
    absl.addFilter(_no_order_warning)
    try:
        rdp = sum(r.count * step_rdp(r.sample_rate, r.noise_multiplier) for r in releases)
        return float(rdp_module.compute_epsilon(RDP_ORDERS, rdp, delta)[0])
    finally:
        absl.removeFilter(_no_order_warning)


def _no_order_warning(record: logging.LogRecord) -> bool:
    """dp-accounting skips an RDP order whose series does not converge, and warns each
    time; the epsilon is the minimum over the other orders, so the warning is noise."""
    return "failed to converge" not in record.getMessage()


def merge(releases: Iterable[Release]) -> list[Release]:
    """The same releases with the counts of equal (rate, noise) pairs added up: a
    participant's history stays as long as its distinct settings, not its rounds."""
    counts: dict[tuple[float, float], int] = {}
    for r in releases:
        key = (r.sample_rate, r.noise_multiplier)
        counts[key] = counts.get(key, 0) + r.count
    return [Release(q, z, n) for (q, z), n in counts.items()]

