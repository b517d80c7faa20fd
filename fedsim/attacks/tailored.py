"""Aggregation-tailored attacks (Shejwalkar & Houmansadr, NDSS 2021) on trimmed mean and Krum.

The colluders estimate the benign updates from their own honest ones and submit
`mean - gamma * std` (coordinate-wise). Gamma is tuned by a halving search from
5.0 against a simulation of the server's own rule, run with Flower's functions
on the colluders' honest updates plus the malicious copies:
- trimmed mean: the step is kept when it pulled the aggregate further from the
  mean than the previous try did (the FRL reference's criterion). The simulation
  trims `beta` of its own inputs (copies + colluders), where the reference trims
  as many as there are attackers;
- Multi-Krum: the step is kept when every malicious copy is selected (for Krum,
  which selects one update: when the selected update is a copy).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp.strategy import FedTrimmedAvg, MultiKrum
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum

from fedsim.attacks.base import Arrays, Attack
from fedsim.clients.base import UPLOADS_DELTAS, UPLOADS_WEIGHTS
from fedsim.errors import is_number, require


def search_gamma(succeeds: Callable[[float], bool], start: float = 5.0,
                 tol: float = 1e-5) -> float:
    """The largest gamma found to succeed by halving steps from `start` (0 if none).

    Each try moves gamma up by half the last step on success and down on failure,
    until the last success and the current try are within `tol`.
    """
    gamma, step, best = start, start, 0.0
    while abs(best - gamma) > tol:
        if succeeds(gamma):
            best = gamma
            gamma += step / 2
        else:
            gamma -= step / 2
        step /= 2
    return best


def trimmed_mean_criterion(honest: np.ndarray, deviation: np.ndarray, copies: int,
                           beta: float) -> Callable[[float], bool]:
    """Success test for trimmed mean: the aggregate's distance to the mean grew."""
    mean = honest.mean(axis=0)
    previous = [-1.0]

    def succeeds(gamma: float) -> bool:
        forged = np.repeat((mean - gamma * deviation)[None], copies, axis=0)
        distance = float(np.linalg.norm(trim_mean(np.concatenate([forged, honest]), beta) - mean))
        grew = previous[0] < distance
        previous[0] = distance
        return grew

    return succeeds


def multikrum_criterion(honest: np.ndarray, deviation: np.ndarray, copies: int,
                        num_malicious_nodes: int, num_nodes_to_select: int
                        ) -> Callable[[float], bool]:
    """Success test for (Multi-)Krum: Flower's selection takes every malicious copy it can.

    That is all copies, or, when it selects fewer updates than there are copies
    (Krum selects one), nothing but copies.
    """
    mean = honest.mean(axis=0)
    benign = [RecordDict({"arrays": ArrayRecord([row])}) for row in honest]

    def succeeds(gamma: float) -> bool:
        forged_row = mean - gamma * deviation
        forged = [RecordDict({"arrays": ArrayRecord([forged_row])}) for _ in range(copies)]
        chosen = select_multikrum(forged + benign, num_malicious_nodes, num_nodes_to_select)
        return sum(any(c is f for f in forged) for c in chosen) == min(copies, len(chosen))

    return succeeds


class AggregationTailored(Attack):
    """`mean - gamma * std` of the colluders' honest updates, gamma tuned to the server's rule.

    Parameters
    ----------
    gamma_start, tolerance : float
        The halving search's first gamma and stopping width (reference: 5.0, 1e-5).
    """

    targets = (UPLOADS_WEIGHTS, UPLOADS_DELTAS)
    aggregators = (FedTrimmedAvg, MultiKrum)  # Krum is a MultiKrum

    def __init__(self, fraction: float = 0.1, colluders: int = 25, gamma_start: float = 5.0,
                 tolerance: float = 1e-5) -> None:
        super().__init__(fraction, colluders)
        for name, value in (("gamma_start", gamma_start), ("tolerance", tolerance)):
            require(is_number(value) and value > 0, f"attack.{name}", "a number > 0", value)
        self.gamma_start = gamma_start
        self.tolerance = tolerance
        self.last_gamma = 0.0

    def criterion(self, honest: np.ndarray, deviation: np.ndarray,
                  copies: int) -> Callable[[float], bool]:
        """The success test for the prepared strategy's rule."""
        if isinstance(self.strategy, MultiKrum):
            return multikrum_criterion(honest, deviation, copies,
                                       self.strategy.num_malicious_nodes,
                                       self.strategy.num_nodes_to_select)
        return trimmed_mean_criterion(honest, deviation, copies, self.strategy.beta)

    def craft(self, honest: list[Arrays], global_arrays: Arrays, num_malicious: int) -> Arrays:
        keys = list(honest[0])
        flat = np.stack([np.concatenate([h[k].ravel() for k in keys]) for h in honest])
        flat = flat.astype(np.float64)
        # one colluder has no spread to hide in: its honest update is all it can send
        deviation = flat.std(axis=0, ddof=1) if len(flat) > 1 else np.zeros(flat.shape[1])
        self.last_gamma = search_gamma(self.criterion(flat, deviation, num_malicious),
                                       self.gamma_start, self.tolerance)
        forged = flat.mean(axis=0) - self.last_gamma * deviation
        return dict(zip(keys, _unflatten(forged, [honest[0][k].shape for k in keys]), strict=True))


def _unflatten(flat: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    sizes = [int(np.prod(shape)) for shape in shapes]
    parts = np.split(flat, np.cumsum(sizes)[:-1])
    return [part.reshape(shape) for part, shape in zip(parts, shapes, strict=True)]
