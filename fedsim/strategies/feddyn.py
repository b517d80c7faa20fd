"""FedDyn (Acar et al., ICLR 2021): federated learning with dynamic regularization.

Each client i keeps a gradient state g_i and minimizes, from the global model x,

    L_i(w) - <g_i, w> + alpha/2 * ||w - x||^2,

then updates g_i <- g_i - alpha * (y_i - x) (`fedsim.clients.feddyn`). The server
keeps h and, from the clients S that replied, of N in all:

    h <- h - alpha / N * sum_{i in S} (y_i - x)        x <- mean_{i in S} y_i - h / alpha

(the paper's unweighted mean). The server sends alpha in the train config
(`feddyn-alpha`), so both sides use one value.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedsim.errors import is_int, is_number, require
from fedsim.strategies.base import UploadStrategy, is_statistic, stack_deltas

#: The train-config key that carries alpha to the clients.
ALPHA = "feddyn-alpha"
#: What the FedDyn client uploads: its weights (it needs alpha from this strategy).
UPLOADS_FEDDYN_WEIGHTS = "weights (feddyn)"

Arrays = dict[str, np.ndarray]


def server_update(x: Arrays, h: Arrays, ys: list[Arrays], alpha: float, num_clients: int
                  ) -> tuple[Arrays, Arrays]:
    """FedDyn's server step: (new x, new h) from the repliers' weights, for the entries of
    `h` (the parameters); the others (normalization statistics) take the mean."""
    new_h, new_x = {}, {}
    for key, weights in x.items():
        mean = np.mean([np.asarray(y[key], np.float64) for y in ys], axis=0)
        if key in h:
            drift = sum(np.asarray(y[key], np.float64) - weights for y in ys)
            new_h[key] = h[key] - alpha / num_clients * drift
            mean = mean - new_h[key] / alpha
        elif np.issubdtype(weights.dtype, np.integer):
            mean = np.rint(mean)
        new_x[key] = mean.astype(weights.dtype)
    return new_x, {k: v.astype(x[k].dtype) for k, v in new_h.items()}


class FedDyn(UploadStrategy):
    """FedDyn's server (see the module).

    Parameters
    ----------
    num_clients : int
        N, the number of clients (the run's `num_clients`).
    alpha : float (default: 0.01)
        The regularization weight, sent to every client (the paper tunes it over
        {0.1, 0.01, 0.001}).
    **kwargs
        FedAvg's sampling and record-key arguments.
    """

    expects_uploads = UPLOADS_FEDDYN_WEIGHTS

    def __init__(self, num_clients: int, alpha: float = 0.01, **kwargs) -> None:
        require(is_int(num_clients) and num_clients >= 1, "strategy.num_clients",
                "an integer >= 1", num_clients)
        require(is_number(alpha) and alpha > 0, "strategy.alpha", "a number > 0", alpha)
        super().__init__(**kwargs)
        self.num_clients = num_clients
        self.alpha = alpha
        self.h: Arrays | None = None  # one array per floating entry, zero at the start

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send alpha with the train config."""
        config = ConfigRecord({**dict(config.items()), ALPHA: float(self.alpha)})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_uploads(
        self, server_round: int, uploads: list[tuple[int, ArrayRecord]]
    ) -> tuple[ArrayRecord, dict[str, float]]:
        """The new global model from the repliers' weights and the updated h."""
        stacked = stack_deltas(uploads, self.current_arrays)  # checked: same keys and shapes
        ys = [{key: values[i] for key, values in stacked.items()} for i in range(len(uploads))]
        if self.h is None:
            self.h = {k: np.zeros_like(v) for k, v in self.current_arrays.items()
                      if np.issubdtype(v.dtype, np.floating) and not is_statistic(k)}
        new, self.h = server_update(self.current_arrays, self.h, ys, self.alpha,
                                    self.num_clients)
        norm = float(np.sqrt(sum(float(np.square(v).sum()) for v in self.h.values())))
        return ArrayRecord({k: Array(v) for k, v in new.items()}), {"h-norm": norm}
