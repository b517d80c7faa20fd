"""Shared bases for strategies with their own upload format and aggregation rule.

Flower's strategies receive trained weights and return the new global weights.
Methods like FedLD instead combine the clients' *updates* `d_i = w_i - w` into
one server update, and FRL votes on integer rankings. `UploadStrategy` keeps
FedAvg's sampling, messaging and metric aggregation, remembers the global arrays
it sent and hands the replies, in node order, to one method: `aggregate_uploads`.
`DeltaStrategy` is that for deltas: it checks every reply against the global
arrays and leaves `aggregate_deltas` to implement.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim.clients.base import UPLOADS_DELTAS, UPLOADS_WEIGHTS
from fedsim.errors import MessageError
from fedsim.reply_check import same_arrays_problem
from fedsim.state import Checkpointed


class UploadStrategy(Checkpointed, FedAvg):
    """FedAvg's round structure around a pluggable rule for combining uploads.

    It remembers the global arrays it sent (`current_arrays`), orders the replies
    by node id (the same input on every backend, whatever the arrival order) and
    hands them to `aggregate_uploads`, which returns the new global arrays and any
    metrics of the rule; a rule that weighs replies by what the clients report
    reads `upload_metrics` (node id -> the reply's metrics). Training metrics are
    aggregated as in FedAvg.
    """

    #: What the matching trainers upload; `fedsim.config.validate` checks the pair.
    expects_uploads = UPLOADS_WEIGHTS

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.current_arrays: dict[str, np.ndarray] | None = None
        #: the metrics of this round's replies by node id, for rules that read them
        self.upload_metrics: dict[int, dict[str, float]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global arrays sent this round; replies are read against them."""
        self.current_arrays = {key: array.numpy() for key, array in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Apply the rule to the repliers' uploads, in node order."""
        valid_replies, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid_replies:
            return None, None
        if self.current_arrays is None:
            raise RuntimeError("aggregate_train called before configure_train")
        uploads = sorted(
            ((msg.metadata.src_node_id, only_arrayrecord(msg)) for msg in valid_replies),
            key=lambda upload: upload[0],
        )
        self.upload_metrics = {msg.metadata.src_node_id: dict(only_metricrecord(msg).items())
                               for msg in valid_replies}
        arrays, rule_metrics = self.aggregate_uploads(server_round, uploads)
        metrics = self.train_metrics_aggr_fn(
            [msg.content for msg in valid_replies], self.weighted_by_key
        )
        for key, value in rule_metrics.items():
            metrics[key] = value
        return arrays, metrics

    @abstractmethod
    def aggregate_uploads(
        self, server_round: int, uploads: list[tuple[int, ArrayRecord]]
    ) -> tuple[ArrayRecord, dict[str, float]]:
        """The new global arrays (and the rule's metrics) from (node id, upload) pairs."""


class DeltaStrategy(UploadStrategy):
    """A rule for combining client deltas `d_i = w_i - w` into one server update.

    Training metrics gain `update-norm` (the server update's L2 norm),
    `mean-delta-norm` (that of the plain mean of the deltas) and `update-cosine`
    (the cosine between the two), so a run shows how far, and in which direction,
    the rule moves the model compared with averaging.

    Subclasses implement `aggregate_deltas(server_round, deltas)`, which gets, for
    every state entry, the stacked deltas of the clients that replied (shape
    `(m, *entry_shape)`, floating) and returns that entry's server update. The new
    global arrays are `w + update`, cast back to each entry's dtype.
    """

    expects_uploads = UPLOADS_DELTAS

    def upload_problem(self, upload: ArrayRecord, sent: dict[str, np.ndarray]) -> str | None:
        """The reply check's upload rule (`fedsim.hooks`): the sent keys and shapes, finite,
        and not trained weights sent where a delta belongs (`weights_as_delta_problem`)."""
        return same_arrays_problem(upload, sent) or weights_as_delta_problem(
            {key: array.numpy() for key, array in upload.items()}, sent)

    def aggregate_uploads(
        self, server_round: int, uploads: list[tuple[int, ArrayRecord]]
    ) -> tuple[ArrayRecord, dict[str, float]]:
        """Stack the deltas, aggregate them, and apply the update to `w`."""
        deltas = stack_deltas(uploads, self.current_arrays)
        update = self.aggregate_deltas(server_round, deltas)
        mean = {key: d.mean(axis=0) for key, d in deltas.items()}
        return apply_update(self.current_arrays, update), {
            "update-norm": global_norm(update.values()),
            "mean-delta-norm": global_norm(mean.values()),
            "update-cosine": global_cosine(update, mean),
        }

    @abstractmethod
    def aggregate_deltas(
        self, server_round: int, deltas: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The server update for every state entry from the stacked client deltas."""


#: an upload this much closer to the global weights than to zero is read as weights
WEIGHTS_RATIO = 0.5


def weights_as_delta_problem(upload: dict[str, np.ndarray], sent: dict[str, np.ndarray]
                             ) -> str | None:
    """Trained weights uploaded where a delta `w_i - w` belongs, or None.

    Over the floating entries, weights `u = w + d` lie near the global `w`:
    `||u - w|| = ||d||`, a fraction of `||u||`. A real delta lies near zero instead:
    `||d - w|| < 0.5 ||d||` would need a delta longer than `2/3 ||w||` and aligned with
    `w`, which local training does not produce. Applied as a delta, such an upload
    adds the model to itself: the update's norm doubles every round.
    """
    floating = [k for k, v in sent.items() if np.issubdtype(v.dtype, np.floating)]
    size = global_norm(upload[k] for k in floating)
    off = global_norm(upload[k].astype(np.float64) - sent[k] for k in floating)
    if size == 0 or off >= WEIGHTS_RATIO * size:
        return None
    return (f"uploads weights, not deltas: the upload is {off / size:.2g} x its own norm from "
            "the global weights (a delta w_i - w lies near zero); this strategy needs a "
            "client that uploads w_i - w, as fedsim's own client for it does (method=<name>)")


def global_norm(arrays: Iterable[np.ndarray]) -> float:
    """The L2 norm of all arrays taken together as one flat vector."""
    return float(np.sqrt(sum(float(np.square(a).sum()) for a in arrays)))


def global_cosine(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """The cosine between `a` and `b`, each entry set taken as one flat vector (0 if
    either is zero)."""
    dot = sum(float(np.vdot(a[key].astype(np.float64), b[key])) for key in a)
    norms = global_norm(a.values()) * global_norm(b[key] for key in a)
    return dot / norms if norms > 0 else 0.0


def only_arrayrecord(message: Message) -> ArrayRecord:
    """The reply's single ArrayRecord (Flower's reply validation guarantees exactly one)."""
    return next(iter(message.content.array_records.values()))


def only_metricrecord(message: Message) -> MetricRecord:
    """The reply's single MetricRecord (Flower's reply validation guarantees exactly one)."""
    return next(iter(message.content.metric_records.values()))


def stack_deltas(
    uploads: list[tuple[int, ArrayRecord]], reference: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Per state entry, the clients' deltas stacked along a new first axis.

    Every upload must carry exactly the reference's keys with the same shapes and
    kinds of dtype, and finite values (`fedsim.reply_check.same_arrays_problem`; the
    server's reply check has dropped any that do not); one that does not is
    rejected with the node, the key and what was expected.
    """
    for node_id, record in uploads:
        problem = same_arrays_problem(record, reference)
        if problem:
            raise MessageError(f"reply from node {node_id}: {problem}")
    return {key: _stack([record[key].numpy() for _, record in uploads]) for key in reference}


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """Floating uploads keep their dtype (float32 halves the memory); others become float64."""
    stacked = np.stack(arrays)
    return stacked if np.issubdtype(stacked.dtype, np.floating) else stacked.astype(np.float64)


#: State entries that must stay >= 0 (BatchNorm variances): a rule that is not a convex
#: combination of the clients' values can push them below 0, and evaluation to NaN.
NONNEGATIVE_SUFFIXES = ("running_var",)
#: State entries that are normalization statistics, not trained parameters: rules that
#: extrapolate or correct parameters (FedNova, FedDyn, SCAFFOLD) average these instead.
STATISTICS_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def is_statistic(key: str) -> bool:
    """Whether state entry `key` is a normalization statistic (`STATISTICS_SUFFIXES`)."""
    return key.endswith(STATISTICS_SUFFIXES)


def apply_update(
    current: dict[str, np.ndarray], update: dict[str, np.ndarray]
) -> ArrayRecord:
    """`w + update` per entry, in each entry's own dtype (integer entries are rounded).

    Entries named `*running_var` are clipped at 0 (see `NONNEGATIVE_SUFFIXES`).
    """
    new_arrays = {}
    for key, weights in current.items():
        step = update[key]
        if np.issubdtype(weights.dtype, np.integer):
            step = np.rint(step)
        new = np.asarray(weights + step)
        if key.endswith(NONNEGATIVE_SUFFIXES):
            new = np.clip(new, 0.0, None)
        new_arrays[key] = Array(new.astype(weights.dtype, copy=False))
    return ArrayRecord(new_arrays)
