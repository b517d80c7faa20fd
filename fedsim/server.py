"""The server side of a run: strategy, initial model, evaluation, the round loop.

The round loop itself is Flower's `Strategy.start`; this module only assembles
its inputs and records what it produces.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from fedsim.attacks.base import attach_attack
from fedsim.backends.base import MeteredGrid
from fedsim.clients.base import predict, resolve_device
from fedsim.datasets.federated import FederatedData
from fedsim.faults import ReplyGuard, same_arrays_problem
from fedsim.metrics import (
    NUM_EXAMPLES,
    aggregate_client_evaluations,
    classification_metrics,
    measured,
)
from fedsim.recording import RunRecorder
from fedsim.runtime import initial_model, preflight

NO_TIMEOUT = 7 * 24 * 3600.0


def build_strategy(cfg: DictConfig) -> Strategy:
    """The configured Flower strategy with fedsim's cohort sizes and metric aggregation.

    `fraction_*` alone can round down (int(0.29 * 100) == 28), so the `min_*`
    counts pin the cohort to exactly `clients_per_round`. Client evaluations are
    combined by `aggregate_client_evaluations`: Flower's weighted means, plus
    means over clients and per class group.
    """
    n = cfg.num_clients
    k_eval = cfg.evaluation.clients_per_round
    return instantiate(
        cfg.strategy,
        fraction_train=cfg.clients_per_round / n,
        min_train_nodes=cfg.clients_per_round,
        fraction_evaluate=k_eval / n,
        min_evaluate_nodes=k_eval,
        min_available_nodes=n,
        evaluate_metrics_aggr_fn=aggregate_client_evaluations,
    )


def guarded(cfg: DictConfig, strategy: Strategy, grid: Grid, data: FederatedData) -> ReplyGuard:
    """`grid` behind a `ReplyGuard` with the strategy's weight key and upload check."""
    splits = data.splits
    return ReplyGuard(
        grid,
        weight_key=getattr(strategy, "weighted_by_key", NUM_EXAMPLES),
        max_examples=cfg.faults.max_num_examples or len(splits.y_train) + len(splits.y_test),
        check_upload=getattr(strategy, "upload_problem", same_arrays_problem),
        min_replies=cfg.faults.min_replies,
        max_skipped_rounds=cfg.faults.max_skipped_rounds,
    )


def make_evaluator(
    model: nn.Module,
    data: FederatedData,
    strategy: Strategy | None = None,
    classes: Sequence[int] = (),
):
    """Centralized evaluation of global arrays on the server's test split, in `model`.

    A strategy with an `evaluation_arrays` method (FedLoGe's realigned generic head)
    decides which arrays are evaluated; reports head/middle/tail accuracy on
    long-tailed data, and `accuracy-class-<c>` for each of `classes`.
    """
    x_test, y_test = data.server_test()
    transform = getattr(strategy, "evaluation_arrays", None)

    def evaluate(arrays: ArrayRecord) -> dict[str, float]:
        if transform is not None:
            arrays = transform(arrays)
        model.load_state_dict(arrays.to_torch_state_dict())
        return measured(classification_metrics(
            predict(model, x_test), y_test, data.class_groups, classes))

    return evaluate


def reported_classes(cfg: DictConfig, strategy: Strategy) -> list[int]:
    """`evaluation.classes` plus the classes whose holders the strategy simulates as slow."""
    slow = getattr(strategy, "slow_classes", [])
    return sorted(set(cfg.evaluation.get("classes", [])) | set(slow))


def run_server(grid: Grid, cfg: DictConfig) -> dict[str, Any]:
    """Run `cfg.num_rounds` rounds of the configured strategy on `grid`; return the summary."""
    data, run_dir = preflight(cfg)  # again here: deployments reach the ServerApp without the CLI
    logging.getLogger("flwr").setLevel(cfg.flwr_log_level)
    torch.set_num_threads(cfg.torch_threads)
    random.seed(cfg.seed)  # Flower's sample_nodes draws from the global `random`
    model = initial_model(cfg, data)
    initial = ArrayRecord(model.state_dict())
    strategy = build_strategy(cfg)
    if hasattr(strategy, "bind_run"):  # simulated device delays and what else the rule reads
        strategy.bind_run(cfg, data)
    metered = MeteredGrid(guarded(cfg, strategy, attach_attack(cfg, strategy, grid), data))
    evaluate = make_evaluator(model.to(resolve_device(cfg.device)), data, strategy,
                              reported_classes(cfg, strategy))
    recorder = RunRecorder(cfg, metered, evaluate, instantiate(cfg.logger), run_dir)
    try:
        recorder.write_inputs(data)
        recorder.attach(strategy)
        strategy.start(
            grid=metered,
            initial_arrays=initial,
            num_rounds=cfg.num_rounds,
            timeout=cfg.faults.timeout_s or NO_TIMEOUT,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=recorder.end_of_round,
        )
    except BaseException:
        recorder.abort()
        raise
    return recorder.finish()
