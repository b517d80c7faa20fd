"""The server side of a run: strategy, initial model, evaluation, the round loop.

The round loop itself is Flower's `Strategy.start`, run on an `EngineStrategy`
around the configured strategy; this module only assembles its inputs and
records what it produces.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fedsim import checkpoint
from fedsim.attacks.base import attach_attack
from fedsim.backends.base import MeteredGrid
from fedsim.clients.base import predict, resolve_device
from fedsim.datasets.federated import FederatedData
from fedsim.engine_strategy import EngineStrategy, TrainingNodesGrid, held_out_nodes
from fedsim.hooks import strategy_hooks
from fedsim.metrics import classification_metrics, measured
from fedsim.recording import RunRecorder, code_fingerprint
from fedsim.reply_check import ReplyGuard
from fedsim.runtime import build_strategy, initial_model, server_preflight
from fedsim.state import checkpoint_state, load_checkpoint_state
from fedsim.train_config import FINETUNE_EPOCHS, client_settings, message_config

NO_TIMEOUT = 7 * 24 * 3600.0
#: config field -> object: the server's checkpointed state (`fedsim.state`)
Stateful = dict[str, object]
log = logging.getLogger("fedsim")


def guarded(cfg: DictConfig, strategy: Strategy, grid: Grid, data: FederatedData,
            malicious: frozenset[int] = frozenset()) -> ReplyGuard:
    """`grid` behind a `ReplyGuard` with the strategy's weight key and upload check, which
    knows the attack's `malicious` nodes (to tell a destroyed model from failing clients)."""
    splits, hooks = data.splits, strategy_hooks(strategy)
    return ReplyGuard(
        grid,
        weight_key=hooks.weighted_by_key,
        max_examples=cfg.faults.max_num_examples or len(splits.y_train) + len(splits.y_test),
        check_upload=hooks.upload_problem,
        min_replies=cfg.faults.min_replies,
        max_skipped_rounds=cfg.faults.max_skipped_rounds,
        timeout_s=cfg.faults.timeout_s,
        malicious=malicious,
    )


def make_evaluator(
    model: nn.Module,
    data: FederatedData,
    strategy: Strategy | None = None,
    classes: Sequence[int] = (),
):
    """Centralized evaluation of global arrays on the server's test split, in `model`.

    A strategy's `evaluation_arrays` hook (e.g. a realigned generic head)
    decides which arrays are evaluated, and its `evaluation_variants` adds other
    views, each reported under its name as a prefix; reports head/middle/tail accuracy on
    long-tailed data, and `accuracy-class-<c>` for each of `classes`.
    """
    x_test, y_test = data.server_test()
    hooks = None if strategy is None else strategy_hooks(strategy)
    transform = None if hooks is None else hooks.evaluation_arrays
    variants = {} if hooks is None else hooks.evaluation_variants

    def scored(arrays: ArrayRecord) -> dict[str, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        return measured(classification_metrics(
            predict(model, x_test), y_test, data.class_groups, classes))

    def evaluate(arrays: ArrayRecord) -> dict[str, float]:
        metrics = scored(arrays if transform is None else transform(arrays))
        for name, view in variants.items():
            metrics |= {f"{name}-{key}": value for key, value in scored(view(arrays)).items()}
        return metrics

    return evaluate


def reported_classes(cfg: DictConfig, strategy: Strategy) -> list[int]:
    """`evaluation.classes` plus the classes whose holders the strategy simulates as slow."""
    slow = strategy_hooks(strategy).slow_classes
    return sorted(set(cfg.evaluation.get("classes", [])) | set(slow))


def run_server(grid: Grid, cfg: DictConfig) -> dict[str, Any]:
    """Run `cfg.num_rounds` rounds of the configured strategy on `grid`; return the summary."""
    data, run_dir = server_preflight(cfg)  # the driver's, or its own when deployed
    logging.getLogger("flwr").setLevel(cfg.flwr_log_level)
    torch.set_num_threads(cfg.torch_threads)
    random.seed(cfg.seed)  # Flower's sample_nodes draws from the global `random`
    model = initial_model(cfg, data)
    strategy = build_strategy(cfg)
    hooks = strategy_hooks(strategy)
    hooks.bind_run(cfg, data)  # simulated device delays and what else the rule reads
    attacked, malicious = attach_attack(cfg, strategy, grid)
    guard = guarded(cfg, strategy, attacked, data, malicious)
    # the server's objects that change as rounds go by, each checkpointed by fedsim.state
    stateful: Stateful = {"strategy": strategy, "guard": guard}
    if attacked is not grid:
        stateful |= {"attack-grid": attacked, "attack": attacked.attack}
    metered = MeteredGrid(guard)
    evaluate = make_evaluator(model.to(resolve_device(cfg.device)), data, strategy,
                              reported_classes(cfg, strategy))
    recorder = RunRecorder(cfg, metered, evaluate, instantiate(cfg.logger), run_dir)
    resumed = checkpoint.load(run_dir) if cfg.resume else None
    try:
        arrays, done = ArrayRecord(model.state_dict()), 0
        if resumed is None:
            recorder.write_inputs(data)
        else:
            arrays, done = resumed.arrays, resumed.server_round
            restore(resumed, stateful, grid)
            recorder.resume(done, **resumed.counters)
        recorder.follow_updates(hooks.update_log)  # the restored log, when resumed
        held_out = held_out_nodes(cfg.evaluation.get("new_clients", 0.0), cfg.num_clients)
        engine = EngineStrategy(
            strategy, done=done, malicious=malicious,
            on_train=(recorder.record_train, guard.after_train),
            on_evaluate=(recorder.record_client_eval,), held_out=held_out,
        )
        after_round = checkpointing(cfg, recorder, stateful, grid)
        if resumed is not None:
            checkpoint.restore_rng(resumed.rng)  # last: nothing may draw before round done + 1
        engine.start(
            grid=TrainingNodesGrid(metered, held_out) if held_out else metered,
            initial_arrays=arrays,
            num_rounds=cfg.num_rounds - done,
            timeout=cfg.faults.timeout_s or NO_TIMEOUT,
            train_config=ConfigRecord({**client_settings(cfg.client),
                                       **message_config(plain(cfg.train_config), "train_config")}),
            evaluate_config=ConfigRecord({**finetuning(cfg), **message_config(
                plain(cfg.evaluate_config), "evaluate_config")}),
            evaluate_fn=after_round,
        )
    except BaseException:
        recorder.abort()
        raise
    summary = recorder.finish()
    (run_dir / checkpoint.CHECKPOINT_FILE).unlink(missing_ok=True)  # finished: never resumed
    return summary


def finetuning(cfg: DictConfig) -> dict[str, int]:
    """The evaluate config entry asking clients to also score a fine-tuned copy."""
    epochs = int(cfg.evaluation.get("finetune_epochs", 0))
    return {FINETUNE_EPOCHS: epochs} if epochs else {}


def plain(node: DictConfig) -> dict:
    """A config map as plain Python values (what a Flower record takes)."""
    return OmegaConf.to_container(node, resolve=True)


def checkpointing(
    cfg: DictConfig, recorder: RunRecorder, stateful: Stateful, grid: Grid
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """The `evaluate_fn` of the round loop: record the round, then write a checkpoint
    every `checkpoint.every` rounds (not after the last: the run is finished then)."""
    every = cfg.checkpoint.every

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        metrics = recorder.end_of_round(server_round, arrays)
        if every and server_round % every == 0 and 0 < server_round < cfg.num_rounds:
            checkpoint.save(recorder.run_dir, checkpoint.Checkpoint(
                server_round=server_round,
                arrays=arrays,
                objects={name: checkpoint_state(obj) for name, obj in stateful.items()},
                clients=checkpoint.client_states(grid),
                rng=checkpoint.rng_state(),
                counters={"elapsed_s": recorder.elapsed_s(), "rows": recorder.rows,
                          "updates_written": recorder.updates_written()},
                code=code_fingerprint(),
            ))
        return metrics

    return after_round


def restore(resumed: checkpoint.Checkpoint, stateful: Stateful, grid: Grid) -> None:
    """Put the server's objects and the nodes' state back as they were after round
    `resumed.server_round`."""
    if resumed.code != code_fingerprint():
        log.warning("resuming with other code than the checkpoint's (%s, now %s): the rest "
                    "of the run may differ from an uninterrupted one", resumed.code,
                    code_fingerprint())
    for name, obj in stateful.items():
        load_checkpoint_state(obj, resumed.objects.get(name, {}), name)
    checkpoint.restore_clients(grid, resumed.clients)
    log.info("resuming after round %d", resumed.server_round)
