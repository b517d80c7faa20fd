"""The strategy the engine runs: the user's strategy, plus what fedsim adds to every round.

`EngineStrategy` holds the configured strategy (`inner`) and is what Flower's
round loop (`Strategy.start`, inherited unchanged) runs on. Its four round
methods hand each call to `inner`, adding:

- the round offset of a resumed run: loop round r reaches `inner` (and every
  observer, and `evaluate_fn`) as round `done + r`, so a resumed run sees the
  same round numbers as an uninterrupted one; the resumed loop's round 0 (the
  checkpoint's model, already evaluated and recorded) is not evaluated again;
- the benign-majority cohort redraw of an attacked run (`malicious`);
- observers of each aggregated round (`on_train`, `on_evaluate`): the recorder's
  metric capture, the reply guard's skipped-round accounting;
- no client-side evaluation metrics when no reply reports an example (nothing to
  weight by; Flower's aggregation would divide by zero);
- held-out new clients (`evaluation.new_clients`): nodes the strategy never sees (the
  grid it samples from, `TrainingNodesGrid`, leaves them out), evaluated every round on
  their own test splits and reported as `new-*` client metrics.

The user's strategy is never changed: nothing is set on it. Its own `self.` calls
reach its own methods, which is why a strategy that overrides `start` (a round
loop of its own, which the wrapper could not see into) is refused rather than run
without recording, guarding and resuming.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedsim.attacks.base import benign_majority_cohort
from fedsim.backends.base import GridWrapper
from fedsim.errors import ConfigError
from fedsim.metrics import NUM_EXAMPLES, aggregate_client_evaluations

#: (round, train replies, aggregated arrays, aggregated metrics) after each aggregate_train
TrainObserver = Callable[[int, list[Message], ArrayRecord | None, MetricRecord | None], None]
#: (round, aggregated client-eval metrics) after each aggregate_evaluate
EvaluateObserver = Callable[[int, MetricRecord | None], None]
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


def examples(reply: Message) -> float:
    """`num-examples` of a successful reply (0 for errors or when missing)."""
    if not reply.has_content():
        return 0.0
    return sum(float(r.get(NUM_EXAMPLES, 0)) for r in reply.content.metric_records.values())


def held_out_nodes(fraction: float, num_clients: int) -> frozenset[int]:
    """Simulation node ids of the clients kept out of training (`evaluation.new_clients`):
    the last `round(fraction * num_clients)` partitions (node i + 1 holds partition i;
    partitions are drawn at random, so the last ones are any ones)."""
    count = round(fraction * num_clients)
    return frozenset(range(num_clients - count + 1, num_clients + 1))


class TrainingNodesGrid(GridWrapper):
    """`grid` whose node list leaves out `held_out`: a strategy sampling from it never
    trains (or evaluates) them; messages to them still pass."""

    def __init__(self, grid: Grid, held_out: frozenset[int]) -> None:
        super().__init__(grid)
        self.held_out = held_out

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self.grid.get_node_ids() if node not in self.held_out]


def check_round_loop(inner: Strategy) -> None:
    """Refuse a strategy with a round loop of its own (an overridden `Strategy.start`)."""
    if type(inner).start is not Strategy.start:
        raise ConfigError(
            f"strategy: {type(inner).__name__} overrides Strategy.start; fedsim runs "
            "Flower's round loop itself (to record, check replies, resume and attack every "
            "round), so put the strategy's per-round work in configure_train, "
            "aggregate_train, configure_evaluate and aggregate_evaluate"
        )


class EngineStrategy(Strategy):
    """`inner` in Flower's round loop, with fedsim's per-round additions (module docstring).

    Parameters
    ----------
    inner : the configured strategy; it must not override `Strategy.start`.
    done : rounds already done (a resumed run), 0 for a new one.
    malicious : node ids of malicious clients; a training cohort with half or more
        of them is redrawn from `inner`'s own sampling.
    on_train, on_evaluate : called, in order, after each aggregation.
    held_out : node ids of new clients, evaluated every round beside `inner`'s evaluation
        cohort; the grid `inner` samples from must leave them out (`TrainingNodesGrid`).
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        done: int = 0,
        malicious: frozenset[int] = frozenset(),
        on_train: Sequence[TrainObserver] = (),
        on_evaluate: Sequence[EvaluateObserver] = (),
        held_out: frozenset[int] = frozenset(),
    ) -> None:
        check_round_loop(inner)
        self.held_out = held_out
        self.inner = inner
        self.done = done
        self.malicious = malicious
        self.on_train = tuple(on_train)
        self.on_evaluate = tuple(on_evaluate)

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.done
        if not self.malicious:
            return self.inner.configure_train(server_round, arrays, config, grid)
        return benign_majority_cohort(
            lambda: self.inner.configure_train(server_round, arrays, config, grid),
            self.malicious,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.done
        replies = list(replies)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        for observe in self.on_train:
            observe(server_round, replies, arrays, metrics)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_evaluate(server_round + self.done, arrays,
                                                      config, grid))
        if not self.held_out:
            return messages
        content = messages[0].content if messages else RecordDict(  # as FedAvg builds it
            {"arrays": arrays,
             "config": ConfigRecord({**config, "server-round": server_round + self.done})})
        return [*messages, *(Message(content=content, dst_node_id=node,
                                     message_type=MessageType.EVALUATE)
                             for node in sorted(self.held_out))]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        server_round += self.done
        replies = list(replies)
        new = [r for r in replies if r.metadata.src_node_id in self.held_out]
        replies = [r for r in replies if r.metadata.src_node_id not in self.held_out]
        metrics = None
        if any(examples(reply) > 0 for reply in replies):  # else nothing to weight by
            metrics = self.inner.aggregate_evaluate(server_round, replies)
        new = [r.content for r in new if examples(r) > 0]
        if new:
            metrics = MetricRecord() if metrics is None else metrics
            for key, value in aggregate_client_evaluations(new, NUM_EXAMPLES).items():
                metrics[f"new-{key}"] = value
        for observe in self.on_evaluate:
            observe(server_round, metrics)
        return metrics

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Flower's round loop for `num_rounds` more rounds (`done + 1` onwards);
        `evaluate_fn` gets `inner`'s round numbers."""
        return super().start(grid, initial_arrays, num_rounds, timeout, train_config,
                             evaluate_config, self._shifted(evaluate_fn))

    def _shifted(self, evaluate_fn: EvaluateFn | None) -> EvaluateFn | None:
        if evaluate_fn is None or not self.done:
            return evaluate_fn

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:  # the checkpoint's model: evaluated before the interruption
                return None
            return evaluate_fn(server_round + self.done, arrays)

        return evaluate
