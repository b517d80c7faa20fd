"""The server side of a run: strategy, initial model, evaluation, the round loop.

The round loop itself is Flower's `Strategy.start`; this module only assembles
its inputs and records what it produces.
"""

from __future__ import annotations

import logging
import random
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
from fedsim.clients.base import evaluate_model, resolve_device
from fedsim.datasets.federated import FederatedData
from fedsim.recording import RunRecorder
from fedsim.runtime import initial_model, preflight

NO_TIMEOUT = 7 * 24 * 3600.0


def build_strategy(cfg: DictConfig) -> Strategy:
    """The configured Flower strategy with fedsim's cohort sizes filled in.

    `fraction_*` alone can round down (int(0.29 * 100) == 28), so the `min_*`
    counts pin the cohort to exactly `clients_per_round`.
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
    )


def make_evaluator(model: nn.Module, data: FederatedData):
    """Centralized evaluation of global arrays on the server's test split, in `model`."""
    x_test, y_test = data.server_test()

    def evaluate(arrays: ArrayRecord) -> dict[str, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate_model(model, x_test, y_test)
        return {"loss": loss, "accuracy": accuracy}

    return evaluate


def run_server(grid: Grid, cfg: DictConfig) -> dict[str, Any]:
    """Run `cfg.num_rounds` rounds of the configured strategy on `grid`; return the summary."""
    data, run_dir = preflight(cfg)  # again here: deployments reach the ServerApp without the CLI
    logging.getLogger("flwr").setLevel(cfg.flwr_log_level)
    torch.set_num_threads(cfg.torch_threads)
    random.seed(cfg.seed)  # Flower's sample_nodes draws from the global `random`
    model = initial_model(cfg, data)
    initial = ArrayRecord(model.state_dict())
    strategy = build_strategy(cfg)
    metered = MeteredGrid(attach_attack(cfg, strategy, grid))
    evaluate = make_evaluator(model.to(resolve_device(cfg.device)), data)
    recorder = RunRecorder(cfg, metered, evaluate, instantiate(cfg.logger), run_dir)
    try:
        recorder.write_inputs(data.partitioner)
        recorder.attach(strategy)
        strategy.start(
            grid=metered,
            initial_arrays=initial,
            num_rounds=cfg.num_rounds,
            timeout=NO_TIMEOUT,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=recorder.end_of_round,
        )
    except BaseException:
        recorder.abort()
        raise
    return recorder.finish()
