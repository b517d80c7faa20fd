"""The scaling attack of the FRL reference on FedAvg: a huge update along the global model."""

from __future__ import annotations

from fedsim.attacks.base import Arrays, Attack
from fedsim.clients.base import UPLOADS_DELTAS, UPLOADS_WEIGHTS
from fedsim.errors import is_number, require


class Scaling(Attack):
    """Every malicious client submits the update `factor * w` (w: the global model).

    One such client in a plain mean multiplies the model by about
    `factor / cohort size`, which is enough to destroy it.
    """

    targets = (UPLOADS_WEIGHTS, UPLOADS_DELTAS)

    def __init__(self, fraction: float = 0.1, colluders: int = 0, factor: float = 1e5) -> None:
        super().__init__(fraction, colluders)
        require(is_number(factor), "attack.factor", "a number", factor)
        self.factor = factor

    def craft(self, honest: list[Arrays], global_arrays: Arrays, num_malicious: int) -> Arrays:
        return {key: self.factor * global_arrays[key] for key in honest[0]}
