"""FedNova (Wang et al., NeurIPS 2020): normalized averaging for heterogeneous local steps.

Clients that take more local steps move further and, under FedAvg, pull the
global model toward their own optimum. FedNova divides each client's change
`x - y_i` by its normalizing factor `a_i` (the number of local steps for plain
SGD; `fedsim.clients.fednova.normalizing_factor` with momentum), averages these
normalized changes with the sample shares `p_i`, and rescales by the effective
number of steps `tau_eff = sum_i p_i a_i`:

    x <- x - global_lr * tau_eff * sum_i p_i (x - y_i) / a_i

With equal `a_i` this is FedAvg's weighted mean. The client (`client=fednova`)
uploads its trained weights and reports `a_i` as the metric `fednova-a`.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from fedsim.errors import MessageError, is_number, require
from fedsim.metrics import NUM_EXAMPLES
from fedsim.strategies.base import UploadStrategy, is_statistic, stack_deltas

#: The reply metric that carries a client's normalizing factor a_i.
FACTOR = "fednova-a"
#: What the FedNova client uploads: its weights, with a_i among its metrics.
UPLOADS_WEIGHTS_AND_FACTOR = "weights+fednova-a"

Arrays = dict[str, np.ndarray]


def normalized_update(x: Arrays, ys: list[Arrays], factors: list[float], samples: list[float],
                      global_lr: float = 1.0) -> tuple[Arrays, float]:
    """(the new global model, tau_eff) by FedNova's rule from the clients' weights `ys`, their
    normalizing factors a_i and sample counts n_i; normalization statistics take the
    p-weighted mean, and integer entries are rounded."""
    shares = np.asarray(samples, np.float64) / float(np.sum(samples))
    tau_eff = float(np.dot(shares, factors))
    new = {}
    for key, weights in x.items():
        if is_statistic(key):  # normalization statistics: the p-weighted mean
            step = sum(p * (np.asarray(y[key], np.float64) - weights)
                       for p, y in zip(shares, ys, strict=True))
        else:
            direction = sum(p * (weights - np.asarray(y[key], np.float64)) / a
                            for p, a, y in zip(shares, factors, ys, strict=True))
            step = -global_lr * tau_eff * direction
        if np.issubdtype(weights.dtype, np.integer):
            step = np.rint(step)
        new[key] = (weights + step).astype(weights.dtype)
    return new, tau_eff


class FedNova(UploadStrategy):
    """FedNova's server: FedAvg's sampling with normalized averaging (see the module).

    Parameters
    ----------
    global_lr : float (default: 1.0)
        The server step on the normalized change (1: the paper's FedNova).
    **kwargs
        FedAvg's sampling and record-key arguments.
    """

    expects_uploads = UPLOADS_WEIGHTS_AND_FACTOR

    def __init__(self, global_lr: float = 1.0, **kwargs) -> None:
        require(is_number(global_lr) and global_lr > 0, "strategy.global_lr", "a number > 0",
                global_lr)
        super().__init__(**kwargs)
        self.global_lr = global_lr

    def aggregate_uploads(
        self, server_round: int, uploads: list[tuple[int, ArrayRecord]]
    ) -> tuple[ArrayRecord, dict[str, float]]:
        """The normalized average of the repliers' changes; logs tau_eff."""
        stacked = stack_deltas(uploads, self.current_arrays)  # checked: same keys and shapes
        ys = [{key: values[i] for key, values in stacked.items()} for i in range(len(uploads))]
        factors, samples = [], []
        for node, _ in uploads:
            metrics = self.upload_metrics[node]
            factor = metrics.get(FACTOR)
            if not (is_number(factor) and factor > 0):
                raise MessageError(f"reply from node {node}: metric '{FACTOR}' must be a "
                                   f"number > 0 (got {factor!r}); use client=fednova")
            factors.append(float(factor))
            samples.append(float(metrics[self.weighted_by_key]))
        if sum(samples) <= 0:
            raise MessageError(f"replies report no samples ('{NUM_EXAMPLES}'): nothing to weigh")
        new, tau_eff = normalized_update(self.current_arrays, ys, factors, samples,
                                         self.global_lr)
        return ArrayRecord({k: Array(v) for k, v in new.items()}), {"tau-eff": tau_eff}
