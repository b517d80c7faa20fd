"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates correct client drift.

The server keeps a control variate `c` (one array per model parameter) and sends
it beside the global model `x`, in the same ArrayRecord under `CONTROL` + the
parameter's key. A client (`fedsim.clients.scaffold`) steps on its gradient
corrected by `c - c_i`, where `c_i` is its own variate (persistent client state),
then refreshes `c_i` by the paper's option II and uploads its trained weights
`y_i` and the change `dc_i` of its variate under the same keys. The server moves

    x <- x + global_lr * mean_i (y_i - x)        c <- c + (|S| / N) * mean_i dc_i

over the |S| clients that replied, N the number of clients: the paper's
unweighted means (sample counts are ignored, as in the paper's Algorithm 1).
With `c = c_i = 0` and `global_lr = 1` a round is FedAvg's with equal weights.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedsim.errors import is_int, is_number, require
from fedsim.strategies.base import UploadStrategy, is_statistic, stack_deltas

#: Key prefix of the control variates inside the sent and uploaded ArrayRecords.
CONTROL = "scaffold-c/"
#: What the SCAFFOLD client uploads: trained weights plus its variate's change.
UPLOADS_WEIGHTS_AND_CONTROL = "weights+control"

Arrays = dict[str, np.ndarray]


def split_control(arrays: Arrays) -> tuple[Arrays, Arrays]:
    """(model entries, control entries keyed by the model key) of a combined record."""
    model = {k: v for k, v in arrays.items() if not k.startswith(CONTROL)}
    control = {k.removeprefix(CONTROL): v for k, v in arrays.items() if k.startswith(CONTROL)}
    return model, control


def with_control(model: Arrays, control: Arrays) -> Arrays:
    """One record of model entries and control entries (keys prefixed by `CONTROL`)."""
    return {**model, **{CONTROL + key: value for key, value in control.items()}}


def server_update(
    x: Arrays, c: Arrays, y: list[Arrays], dc: list[Arrays], num_clients: int, global_lr: float
) -> tuple[Arrays, Arrays]:
    """SCAFFOLD's server step: (new x, new c) from the repliers' weights and variate changes.

    x + global_lr * mean(y_i - x) for every parameter; normalization statistics
    (`is_statistic`) take the plain mean; integer entries are rounded. c + len(y) /
    num_clients * mean(dc_i).
    """
    new_x = {}
    for key, weights in x.items():
        lr = 1.0 if is_statistic(key) else global_lr
        step = lr * np.mean([np.asarray(yi[key], np.float64) - weights for yi in y], axis=0)
        if np.issubdtype(weights.dtype, np.integer):
            step = np.rint(step)
        new_x[key] = (weights + step).astype(weights.dtype)
    share = len(dc) / num_clients
    new_c = {key: (value + share * np.mean([d[key] for d in dc], axis=0)).astype(value.dtype)
             for key, value in c.items()}
    return new_x, new_c


class Scaffold(UploadStrategy):
    """SCAFFOLD's server: FedAvg's sampling, plus the control variate `c` (see the module).

    Parameters
    ----------
    num_clients : int
        N, the number of clients (the run's `num_clients`): `c` moves by |S|/N of
        the mean variate change.
    global_lr : float (default: 1.0)
        The server step size on the mean model change (the paper's eta_g).
    **kwargs
        FedAvg's sampling and record-key arguments.
    """

    expects_uploads = UPLOADS_WEIGHTS_AND_CONTROL

    def __init__(self, num_clients: int, global_lr: float = 1.0, **kwargs) -> None:
        require(is_int(num_clients) and num_clients >= 1, "strategy.num_clients",
                "an integer >= 1", num_clients)
        require(is_number(global_lr) and global_lr > 0, "strategy.global_lr", "a number > 0",
                global_lr)
        super().__init__(**kwargs)
        self.num_clients = num_clients
        self.global_lr = global_lr
        self.control: Arrays | None = None  # c, one array per floating model entry

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Send the global model with the server's control variate beside it."""
        model = {key: array.numpy() for key, array in arrays.items()}
        if self.control is None:  # every floating entry but statistics (the client's stay 0)
            self.control = {key: np.zeros_like(value) for key, value in model.items()
                            if np.issubdtype(value.dtype, np.floating)
                            and not is_statistic(key)}
        combined = with_control(model, self.control)
        return super().configure_train(
            server_round, ArrayRecord({k: Array(v) for k, v in combined.items()}), config, grid)

    def aggregate_uploads(
        self, server_round: int, uploads: list[tuple[int, ArrayRecord]]
    ) -> tuple[ArrayRecord, dict[str, float]]:
        """The new global model (without the variates, which stay on the server)."""
        stacked = stack_deltas(uploads, self.current_arrays)  # checked: same keys and shapes
        per_client = [{key: values[i] for key, values in stacked.items()}
                      for i in range(len(uploads))]
        split = [split_control(arrays) for arrays in per_client]
        x, c = split_control(self.current_arrays)
        new_x, self.control = server_update(x, c, [m for m, _ in split], [d for _, d in split],
                                            self.num_clients, self.global_lr)
        norm = float(np.sqrt(sum(float(np.square(v).sum()) for v in self.control.values())))
        return ArrayRecord({k: Array(v) for k, v in new_x.items()}), {"control-norm": norm}
