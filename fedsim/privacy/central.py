"""Central (user-level) DP: Flower's four strategy wrappers, with what fedsim adds.

`DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping` clip each client's
update to a norm and add Gaussian noise to the average. Each subclass here keeps
Flower's clipping and noise and adds:

- accounting: every released aggregate composes one subsampled Gaussian at
  `q = cohort / population` (`fedsim.privacy.accounting`); the round's metrics carry
  `privacy/epsilon` at `delta`;
- uniform weights: the guarantee assumes the mean of clipped updates, so the inner
  strategy weighs every reply by `DP_WEIGHT`, which is 1 in each train reply (Flower's
  weighting by `num-examples` would let a large client exceed the sensitivity) and the
  examples in each evaluation reply (evaluation is weighted as without DP);
- seeded noise: drawn from a generator of (seed, round), not numpy's global one, so a
  run repeats and a resumed run continues as an uninterrupted one;
- noise scaled to the round as it was: to the norm its updates were clipped to (Flower's
  adaptive wrappers move the norm before adding noise) and to the replies averaged (a
  mean of m < cohort updates moves by clipping_norm / m per client; Flower scales to the
  cohort asked), and error replies left out rather than the round dropped;
- a checkpoint of the wrapper's state and of the inner strategy's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import compute_stdv

from fedsim.metrics import NUM_EXAMPLES
from fedsim.privacy.accounting import Release, epsilon, merge
from fedsim.privacy.options import CLIP_MOD
from fedsim.state import CheckpointedWrapper

#: the metric every reply is weighted by under central DP: 1 (a uniform mean)
DP_WEIGHT = "dp-weight"
EPSILON = "privacy/epsilon"
CLIPPING_NORM = "privacy/clipping-norm"


def gaussian_noise(arrays: list[np.ndarray], std: float, seed: int, server_round: int
                   ) -> list[np.ndarray]:
    """`arrays` plus N(0, std^2) noise, drawn from a generator of (seed, round)."""
    rng = np.random.default_rng([seed, server_round])
    return [a + rng.normal(0.0, std, a.shape).astype(a.dtype, copy=False) for a in arrays]


def set_weights(replies: list[Message], weight_of: Callable[[MetricRecord], float]) -> None:
    """Give every reply the weight `DP_WEIGHT` = `weight_of(its metric record)`."""
    for reply in replies:
        if reply.has_content():
            for record in reply.content.metric_records.values():
                record[DP_WEIGHT] = weight_of(record)


class CentralAccounting(CheckpointedWrapper):
    """Mixin for Flower's DP wrappers: accounting, uniform weights, seeded noise, checkpoint.

    It must come before the Flower class in the bases; the wrapper's own attributes are
    set by Flower's constructor, then `start_accounting`.
    """

    strategy: Strategy
    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int

    def start_accounting(self, *, population: int, delta: float, seed: int,
                         accounted_noise: float) -> None:
        self.population = population
        self.delta = delta
        self.seed = seed
        #: the noise multiplier of the whole release (adaptive clipping splits it)
        self.accounted_noise = accounted_noise
        #: [[sample rate, noise multiplier, count], ...] of the released aggregates
        self.releases: list[list[float]] = []
        #: this round's: the seed of its noise, the norm its updates were clipped to and
        #: how many it averages (the noise is scaled to them, not to the next round's norm
        #: or the cohort that was asked)
        self.noise_round = 0
        self.noise_norm = float(self.clipping_norm)
        self.noise_count = int(self.num_sampled_clients)

    def epsilon(self) -> float:
        """The epsilon spent by the aggregates released so far, at `delta`."""
        return epsilon([Release(q, z, int(n)) for q, z, n in self.releases], self.delta)

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        std = compute_stdv(self.noise_multiplier, self.noise_norm, self.noise_count)
        noisy = gaussian_noise(aggregated.to_numpy_ndarrays(), std, self.seed, self.noise_round)
        return ArrayRecord({k: Array(np.asarray(v))
                            for k, v in zip(aggregated.keys(), noisy, strict=True)})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Flower's wrappers skip the whole round on one error reply: average the others
        replies = [r for r in replies if r.has_content()]
        set_weights(replies, lambda _: 1)
        self.noise_round = server_round
        self.noise_norm = norm = float(self.clipping_norm)
        self.noise_count = len(replies)
        arrays, metrics = (super().aggregate_train(server_round, replies)  # type: ignore[misc]
                           if replies else (None, None))
        if arrays is not None:
            q = min(1.0, self.num_sampled_clients / self.population)
            self.releases = [[r.sample_rate, r.noise_multiplier, r.count] for r in merge(
                [*(Release(a, b, int(c)) for a, b, c in self.releases),
                 Release(q, self.accounted_noise, 1)])]
        metrics = MetricRecord() if metrics is None else metrics
        metrics[EPSILON] = self.epsilon()
        metrics[CLIPPING_NORM] = float(norm)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Client evaluations, weighted by their examples as without DP."""
        replies = list(replies)
        set_weights(replies, lambda record: record.get(NUM_EXAMPLES, 0))
        return super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]


class FixedAccounting(CentralAccounting):
    """`CentralAccounting` for Flower's fixed-clipping wrappers (their constructor, then
    the accounting)."""

    def __init__(self, strategy: Strategy, noise_multiplier: float, clipping_norm: float,
                 num_sampled_clients: int, *, population: int, delta: float, seed: int) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm,  # type: ignore[call-arg]
                         num_sampled_clients)
        self.start_accounting(population=population, delta=delta, seed=seed,
                              accounted_noise=noise_multiplier)


class AdaptiveAccounting(CentralAccounting):
    """`CentralAccounting` for Flower's adaptive-clipping wrappers (Andrew et al. 2021):
    the clipped count's noise and the updates' together give `noise_multiplier`, which is
    what is accounted; the clipped count is drawn like the update noise."""

    clipped_count_stddev: float

    def __init__(self, strategy: Strategy, noise_multiplier: float, num_sampled_clients: int,
                 initial_clipping_norm: float, target_clipped_quantile: float,
                 clip_norm_lr: float, clipped_count_stddev: float | None, *, population: int,
                 delta: float, seed: int) -> None:
        super().__init__(strategy, noise_multiplier,  # type: ignore[call-arg]
                         num_sampled_clients, initial_clipping_norm, target_clipped_quantile,
                         clip_norm_lr, clipped_count_stddev)
        self.start_accounting(population=population, delta=delta, seed=seed,
                              accounted_noise=noise_multiplier)

    def _noisy_fraction(self, count: int, total: int) -> float:
        rng = np.random.default_rng([self.seed, self.noise_round, 1])
        return float(rng.normal(count, self.clipped_count_stddev)) / float(total)


class ServerSideFixedClipping(FixedAccounting, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, accounted."""


class ClientSideFixedClipping(FixedAccounting, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (clients clip with `fixedclipping_mod`), accounted."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config[CLIP_MOD] = "fixed"
        return super().configure_train(server_round, arrays, config, grid)


class ServerSideAdaptiveClipping(AdaptiveAccounting,
                                 DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, accounted."""


class ClientSideAdaptiveClipping(AdaptiveAccounting,
                                 DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping (clients run `adaptiveclipping_mod`), accounted."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config[CLIP_MOD] = "adaptive"
        return super().configure_train(server_round, arrays, config, grid)
