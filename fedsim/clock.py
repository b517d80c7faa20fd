"""Simulated device heterogeneity on a virtual clock.

Every client gets a compute *delay*, in units of one fast client's local
training (the length of one synchronous round): a client with delay d needs
1 + d units to train. Delays are fixed, drawn from a distribution, or tied to
the client's data (the holders of one class are slow: "intertwined"
heterogeneity). Nothing sleeps: time is a number that the strategy advances,
and `VirtualClock` orders arrivals deterministically.
"""

from __future__ import annotations

import heapq
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsim.errors import ConfigError, require
from fedsim.spec import RunSpec

log = logging.getLogger("fedsim")


class Devices(ABC):
    """Assigns every client its delay from the federation's label counts and the seed."""

    @abstractmethod
    def delays(self, label_counts: np.ndarray, seed: int) -> np.ndarray:
        """Delay (>= 0) per client; `label_counts[i, c]`: client i's samples of class c."""

    def slow_classes(self) -> list[int]:
        """Classes whose holders this model makes slow (reported per class by the server)."""
        return []

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        """Late clients need a strategy that applies stale updates (one that declares
        `applies_late_updates`; Flower's own strategies would wait for them)."""
        from hydra.utils import get_class

        from fedsim.hooks import applies_late_updates

        strategy = str(spec.cfg.strategy._target_)
        require(applies_late_updates(get_class(strategy)), "strategy",
                "a strategy that applies stale updates (stale, fedbuff, fedasync, dc_asgd, "
                "staleness_inversion) when devices has delays (devices "
                f"{spec.cfg.devices._target_})", strategy)


class NoDelay(Devices):
    """Every client is fast: no staleness (the upper bound of every comparison)."""

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        """No delays: any strategy will do."""

    def delays(self, label_counts: np.ndarray, seed: int) -> np.ndarray:
        return np.zeros(len(label_counts))


class FixedDelay(Devices):
    """A random `fraction` of the clients (drawn from the seed) has delay `delay`."""

    def __init__(self, delay: float = 10.0, fraction: float = 0.2) -> None:
        _check_delay("devices.delay", delay)
        if not (isinstance(fraction, int | float) and 0 <= fraction <= 1):
            raise ConfigError(f"devices.fraction must be a number in [0, 1] (got {fraction!r})")
        self.delay = float(delay)
        self.fraction = float(fraction)

    def delays(self, label_counts: np.ndarray, seed: int) -> np.ndarray:
        n = len(label_counts)
        count = int(np.floor(self.fraction * n + 0.5))
        slow = np.random.default_rng([seed, 7]).permutation(n)[:count]
        out = np.zeros(n)
        out[slow] = self.delay
        return out


#: Distributions `RandomDelay` draws from, each with mean `scale`.
DISTRIBUTIONS = ("exponential", "uniform", "lognormal")


class RandomDelay(Devices):
    """Delays drawn independently per client with mean `scale` (seeded).

    `exponential`: Exp(scale); `uniform`: U(0, 2 * scale); `lognormal`: with log-space
    standard deviation `sigma`, scaled to mean `scale`. `round_to_int` rounds them,
    as synchronous rounds need.
    """

    def __init__(
        self,
        distribution: str = "exponential",
        scale: float = 10.0,
        sigma: float = 1.0,
        round_to_int: bool = True,
    ) -> None:
        if distribution not in DISTRIBUTIONS:
            raise ConfigError(
                f"devices.distribution must be one of {DISTRIBUTIONS} (got {distribution!r})"
            )
        _check_delay("devices.scale", scale)
        if distribution == "lognormal" and scale <= 0:
            raise ConfigError(f"devices.scale must be > 0 for a lognormal (got {scale!r})")
        if not (isinstance(sigma, int | float) and sigma > 0):
            raise ConfigError(f"devices.sigma must be a number > 0 (got {sigma!r})")
        self.distribution = distribution
        self.scale = float(scale)
        self.sigma = float(sigma)
        self.round_to_int = round_to_int

    def delays(self, label_counts: np.ndarray, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, 11])
        n = len(label_counts)
        if self.distribution == "exponential":
            out = rng.exponential(self.scale, n)
        elif self.distribution == "uniform":
            out = rng.uniform(0.0, 2.0 * self.scale, n)
        else:
            out = rng.lognormal(math.log(self.scale) - self.sigma**2 / 2, self.sigma, n)
        return np.rint(out) if self.round_to_int else out


class SlowClassHolders(Devices):
    """The clients holding class `slow_class` have delay `delay`: intertwined heterogeneity.

    With `top_k` set, only the `top_k` clients with the most samples of that class
    are slow (the reference's Dirichlet variant, where every client holds a few).
    """

    def __init__(self, slow_class: int = 5, delay: float = 40.0, top_k: int | None = None) -> None:
        if not (isinstance(slow_class, int) and slow_class >= 0):
            raise ConfigError(f"devices.slow_class must be a class index >= 0 (got {slow_class!r})")
        _check_delay("devices.delay", delay)
        if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
            raise ConfigError(f"devices.top_k must be an integer >= 1 or null (got {top_k!r})")
        self.slow_class = slow_class
        self.delay = float(delay)
        self.top_k = top_k

    def delays(self, label_counts: np.ndarray, seed: int) -> np.ndarray:
        if self.slow_class >= label_counts.shape[1]:
            raise ConfigError(
                f"devices.slow_class must be a class index in [0, {label_counts.shape[1] - 1}] "
                f"(got {self.slow_class})"
            )
        held = label_counts[:, self.slow_class]
        if self.top_k is None:
            slow = np.flatnonzero(held > 0)
        else:  # most samples first; ties by client index, so the choice is deterministic
            slow = np.lexsort((np.arange(len(held)), -held))[: self.top_k]
            slow = slow[held[slow] > 0]
        if len(slow) == 0:
            log.warning("devices: no client holds class %d, so no client is slow", self.slow_class)
        out = np.zeros(len(label_counts))
        out[slow] = self.delay
        return out

    def slow_classes(self) -> list[int]:
        return [self.slow_class]


def _check_delay(name: str, value: Any) -> None:
    if not (isinstance(value, int | float) and not isinstance(value, bool) and value >= 0):
        raise ConfigError(f"{name} must be a number >= 0 (got {value!r})")


@dataclass(order=True)
class Arrival:
    """A client's update reaching the server at virtual `time` (ties: dispatch order)."""

    time: float
    sequence: int
    node_id: int = field(compare=False)
    payload: Any = field(compare=False, default=None)


class VirtualClock:
    """A deterministic event queue of arrivals and the current virtual time.

    Arrivals leave in order of time, then of dispatch (`sequence`), so a run
    does not depend on the order in which a backend returns replies.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[Arrival] = []
        self._sequence = 0

    def schedule(self, node_id: int, duration: float, payload: Any = None) -> Arrival:
        """An arrival `duration` after now."""
        arrival = Arrival(self.now + duration, self._sequence, node_id, payload)
        self._sequence += 1
        heapq.heappush(self._queue, arrival)
        return arrival

    def pop(self, count: int) -> list[Arrival]:
        """The next `count` arrivals (fewer if fewer are pending); time moves to the last."""
        arrivals = [heapq.heappop(self._queue) for _ in range(min(count, len(self._queue)))]
        if arrivals:
            self.now = arrivals[-1].time
        return arrivals

    def advance(self, time: float) -> None:
        """Move time forward to `time` (never back)."""
        self.now = max(self.now, time)

    def pending(self) -> list[Arrival]:
        """Arrivals not yet popped, in the order they will leave."""
        return sorted(self._queue)

    def __len__(self) -> int:
        return len(self._queue)


#: Staleness weighting functions s(tau) (1 at tau = 0); see `staleness_weight`.
WEIGHTINGS = ("constant", "exponential", "polynomial", "hinge")


def staleness_weight(
    staleness: float,
    kind: str = "constant",
    half_life: float = 20.0,
    exponent: float = 0.5,
    hinge_at: float = 10.0,
) -> float:
    """How much an update `staleness` model versions old counts.

    - `constant`: 1 (direct stale aggregation);
    - `exponential`: 2^(-tau / half_life) (the paper's weighted baseline, half-life 20);
    - `polynomial`: (1 + tau)^(-exponent) (FedAsync; FedBuff's 1/sqrt(1 + tau) at 0.5);
    - `hinge`: 1 up to `hinge_at`, then 1 / (exponent * (tau - hinge_at) + 1) (FedAsync).
    """
    if kind == "constant":
        return 1.0
    if kind == "exponential":
        return 2.0 ** (-staleness / half_life)
    if kind == "polynomial":
        return (1.0 + staleness) ** (-exponent)
    if kind == "hinge":
        return 1.0 if staleness <= hinge_at else 1.0 / (exponent * (staleness - hinge_at) + 1.0)
    raise ConfigError(f"strategy.weighting must be one of {WEIGHTINGS} (got {kind!r})")
