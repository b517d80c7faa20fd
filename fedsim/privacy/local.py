"""Local (sample-level) DP: DP-SGD in the client's trainer (Opacus), accounted per client.

Each step draws a Poisson batch (every sample with probability `q = batch / n`),
clips every sample's gradient to `max_grad_norm` and adds N(0, (noise * max_grad_norm)^2)
to their sum before dividing by the expected batch size: DP-SGD (Abadi et al. 2016)
as Opacus implements it (`GradSampleModule`, `DPOptimizer`). The client reports the
rate, steps and noise it really used (`dp-sample-rate`, `dp-steps`, `dp-noise`), and
the server composes each client's own history (`LocalAccounting`): its
`privacy/epsilon` is the largest epsilon of any client so far, the guarantee that
holds for every sample of every client.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedsim.errors import MessageError, is_number, require
from fedsim.hooks import strategy_hooks
from fedsim.privacy.accounting import Release, epsilon, merge
from fedsim.state import CheckpointedWrapper

SAMPLE_RATE = "dp-sample-rate"
STEPS = "dp-steps"
NOISE = "dp-noise"
EPSILON = "privacy/epsilon"
EPSILON_MEAN = "privacy/epsilon-mean"

BatchLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def poisson_batch(n: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson sample of `range(n)`: each one in with probability `rate`."""
    return torch.nonzero(torch.rand(n, generator=generator) < rate).flatten()


class DPSGD:
    """The DP-SGD settings a trainer trains with (module docstring). A plain class, not a
    dataclass: Hydra would turn a dataclass argument of the trainer into a config."""

    def __init__(self, noise_multiplier: float, max_grad_norm: float) -> None:
        require(is_number(noise_multiplier) and noise_multiplier > 0,
                "privacy.noise_multiplier", "a number > 0", noise_multiplier)
        require(is_number(max_grad_norm) and max_grad_norm > 0,
                "privacy.max_grad_norm", "a number > 0", max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)

    def train(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
              y: torch.Tensor, *, batch_size: int, epochs: int, generator: torch.Generator,
              batch_loss: BatchLoss) -> tuple[float, dict[str, float]]:
        """`epochs` epochs of DP-SGD on (x, y), each of `round(n / batch_size)` Poisson
        steps; returns the mean batch loss and the accounting metrics of what ran.

        `batch_loss` is the trainer's mean loss; the per-sample gradients are of the
        summed loss, as DP-SGD's clipping needs. `model` is left without Opacus's hooks.
        """
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        n = len(y)
        if n == 0:  # nothing to train on: no step, nothing released
            return 0.0, {SAMPLE_RATE: 1.0, STEPS: 0, NOISE: self.noise_multiplier}
        rate = min(1.0, batch_size / n)
        steps_per_epoch = max(1, round(n / batch_size))
        noise_generator = torch.Generator(device=x.device)
        noise_generator.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        sampled = GradSampleModule(model, loss_reduction="sum")
        private = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                              max_grad_norm=self.max_grad_norm,
                              expected_batch_size=max(1, round(rate * n)),
                              loss_reduction="mean", generator=noise_generator)
        loss_sum, steps = 0.0, 0
        with warnings.catch_warnings():
            # the inputs need no gradient, so torch says the hooks see only module outputs
            warnings.filterwarnings("ignore", "Full backward hook is firing")
            try:
                for _ in range(epochs * steps_per_epoch):
                    idx = poisson_batch(n, rate, generator).to(x.device)
                    private.zero_grad(set_to_none=True)
                    logits = sampled(x[idx])
                    loss = (batch_loss(logits, y[idx]) * len(idx) if len(idx)
                            else logits.sum() * 0)  # an empty batch: noise alone, still a step
                    loss.backward()
                    private.step()
                    loss_sum += loss.item() / max(len(idx), 1)
                    steps += 1
            finally:
                sampled._close()
        return loss_sum / max(steps, 1), {SAMPLE_RATE: rate, STEPS: steps,
                                          NOISE: self.noise_multiplier}


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

    `privacy/epsilon` is the largest per-client epsilon at `delta` (every sample's
    guarantee), `privacy/epsilon-mean` the mean over the clients that trained so far.
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
