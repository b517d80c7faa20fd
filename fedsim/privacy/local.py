"""Local (sample-level) DP, the server's side: each client's DP-SGD accounted on its own.

Clients train with DP-SGD (`fedsim.privacy.dp_sgd`) and report the rate, steps and noise
they really used; `LocalAccounting` composes each client's own history: its
`privacy/epsilon` is the largest epsilon of any client so far.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.errors import MessageError, is_number
from fedsim.hooks import strategy_hooks
from fedsim.privacy.accounting import Release, epsilon, merge
from fedsim.privacy.dp_sgd import NOISE, SAMPLE_RATE, STEPS
from fedsim.state import CheckpointedWrapper

EPSILON = "privacy/epsilon"
EPSILON_MEAN = "privacy/epsilon-mean"


def reported_release(metrics: dict[str, Any], node: int) -> Release:
    """The DP-SGD release a client's train reply reports, checked."""
    values = [metrics.get(key) for key in (SAMPLE_RATE, NOISE, STEPS)]
    if not all(is_number(v) for v in values) or not 0 < values[0] <= 1 or values[2] < 0:
        raise MessageError(
            f"node {node}'s train reply must report {SAMPLE_RATE} in (0, 1], {NOISE} and "
            f"{STEPS} >= 0 under privacy=local (got {values}); its trainer did not run DP-SGD")
    return Release(float(values[0]), float(values[1]), int(values[2]))


class LocalAccounting(CheckpointedWrapper, Strategy):
    """Any strategy, with each client's DP-SGD composed into its own epsilon.

    `privacy/epsilon` is the largest per-client epsilon at `delta` (for the updates the
    server accepted; docs/privacy.md says what it does not cover), `privacy/epsilon-mean`
    the mean over the clients that trained so far.
    The inner strategy's hooks (`fedsim.hooks`) are its own, passed through.
    """

    def __init__(self, strategy: Strategy, *, delta: float) -> None:
        self.strategy = strategy
        self.delta = delta
        #: node id (as text) -> [[sample rate, noise, steps], ...]
        self.histories: dict[str, list[list[float]]] = {}

    # ---- Flower's round API, handed to the inner strategy -------------------------------
    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            if reply.has_content():
                self._compose(reply)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        metrics = MetricRecord() if metrics is None else metrics
        epsilons = [self.client_epsilon(node) for node in self.histories] or [0.0]
        metrics[EPSILON] = max(epsilons)
        metrics[EPSILON_MEAN] = sum(epsilons) / len(epsilons)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    # ---- accounting -------------------------------------------------------------------
    def _compose(self, reply: Message) -> None:
        node = reply.metadata.src_node_id
        metrics: dict[str, Any] = {}
        for record in reply.content.metric_records.values():
            metrics |= dict(record.items())
        release = reported_release(metrics, node)
        history = [Release(q, z, int(n)) for q, z, n in self.histories.get(str(node), [])]
        self.histories[str(node)] = [[r.sample_rate, r.noise_multiplier, r.count]
                                     for r in merge([*history, release])]

    def client_epsilon(self, node: int | str) -> float:
        """The epsilon client `node`'s samples have spent so far, at `delta`."""
        return epsilon([Release(q, z, int(n)) for q, z, n in self.histories.get(str(node), [])],
                       self.delta)

    # ---- the inner strategy's hooks and checkpoint ------------------------------------
    def bind_run(self, cfg: Any, data: Any) -> None:
        strategy_hooks(self.strategy).bind_run(cfg, data)

    def __getattr__(self, name: str) -> Any:
        """The inner strategy's optional hooks (`fedsim.hooks`), as its own."""
        if name in ("upload_problem", "weighted_by_key", "evaluation_arrays",
                    "evaluation_variants", "slow_classes", "update_log"):
            return getattr(vars(self)["strategy"], name)
        raise AttributeError(name)
