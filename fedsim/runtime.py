"""What each party builds from the run config: data, model factory, trainer.

Built once per process and config (cached), so an in-process run with many
clients builds the dataset once and every Ray worker builds it once.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import Strategy
from hydra.errors import InstantiationException
from hydra.utils import get_class, get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fedsim.clients.base import Trainer
from fedsim.clock import NoDelay
from fedsim.config import validate
from fedsim.datasets.federated import (
    ClientData,
    FederatedData,
    build_federated_data,
    instantiate_input,
)
from fedsim.engine_strategy import held_out_nodes
from fedsim.errors import ConfigError, DataError, FedsimError
from fedsim.metrics import aggregate_client_evaluations
from fedsim.privacy.options import NoPrivacy
from fedsim.recording import prepare_run_dir
from fedsim.spec import CHECKED_GROUPS, RunSpec, check_run


def model_factory(cfg: DictConfig, data: FederatedData) -> Callable[[], nn.Module]:
    """A zero-argument builder of the global model: the configured model for this
    dataset's shapes, extended by the trainer's own shared modules (if any)."""
    return shaped_model_factory(cfg, data.input_shape, data.num_classes)


def shaped_model_factory(cfg: DictConfig, input_shape: Sequence[int], num_classes: int
                         ) -> Callable[[], nn.Module]:
    """`model_factory` for shapes known without the run's dataset (a SuperNode's file)."""
    return partial(_global_model, cfg.model, cfg.client, list(input_shape), num_classes)


def _global_model(
    model_cfg: DictConfig, client_cfg: DictConfig, input_shape: list[int], num_classes: int
) -> nn.Module:
    model = build_model(model_cfg, input_shape, num_classes)
    trainer_cls = get_class(client_cfg._target_)
    return trainer_cls.extend_model(model, tuple(input_shape), num_classes, client_cfg)


def build_model(model_cfg: DictConfig, input_shape: list[int], num_classes: int) -> nn.Module:
    """The configured `torch.nn.Module`, built by its class or factory (any signature):
    `input_shape` and `num_classes` are passed only where it takes them."""
    shapes = {"input_shape": input_shape, "num_classes": num_classes}
    return instantiate(model_cfg, **{k: v for k, v in shapes.items()
                                     if takes_argument(get_object(model_cfg._target_), k)})


def takes_argument(target: Callable, name: str) -> bool:
    """Whether calling `target` (a class or a function) accepts the keyword `name`."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): pass everything
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def initial_model(cfg: DictConfig, data: FederatedData) -> nn.Module:
    """The global model at round 0, initialized from the run seed."""
    torch.manual_seed(cfg.seed)
    return model_factory(cfg, data)()


def check_model_fits(cfg: DictConfig, data: FederatedData) -> None:
    """Build the model and run two dummy samples through it, or raise a `ConfigError`."""
    try:
        model = model_factory(cfg, data)()
    except Exception as err:  # noqa: BLE001 - its constructor refused what it was given
        cause = err.__cause__ or err
        if isinstance(cause, FedsimError):  # the model's own check of its settings
            raise cause from None
        settings = {k: v for k, v in cfg.model.items() if k != "_target_"}
        fix = ("give its constructor what it needs with +model.<name>=<value>"
               if isinstance(cause, TypeError)
               else "change its settings or pick a model that fits this dataset (model=mlp "
                    "fits any dataset)")
        raise ConfigError(
            f"model ({cfg.model._target_}) cannot be built from the settings {settings}"
            f"{_shapes_given(cfg.model, data)}: {_one_line(cause)}; {fix}"
        ) from err
    try:
        with torch.no_grad():
            logits = model(torch.zeros(2, *data.input_shape))
    except Exception as err:  # noqa: BLE001 - any failure here means the pair does not fit
        raise ConfigError(
            f"model ({cfg.model._target_}) cannot take this dataset's samples of shape "
            f"{tuple(data.input_shape)} (a batch of 2: {(2, *data.input_shape)}): "
            f"{_one_line(err)}; pick a model whose input fits (model=mlp fits any dataset)"
        ) from err
    spec = RunSpec(cfg, model, tuple(data.input_shape), data.num_classes)
    check_run([get_class(cfg[group]._target_) for group in CHECKED_GROUPS], spec)
    if tuple(logits.shape) != (2, data.num_classes):
        raise ConfigError(
            f"model ({cfg.model._target_}) returns shape {tuple(logits.shape)[1:]} per sample, "
            f"expected ({data.num_classes},) logits"
        )


def _shapes_given(model_cfg: DictConfig, data: FederatedData) -> str:
    target = get_object(model_cfg._target_)
    given = [f"{k}={v}" for k, v in (("input_shape", list(data.input_shape)),
                                     ("num_classes", data.num_classes))
             if takes_argument(target, k)]
    return f" and {', '.join(given)}" if given else ""


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _check_reported_classes(cfg: DictConfig, num_classes: int) -> None:
    classes = list(cfg.evaluation.get("classes", []))
    if any(c >= num_classes for c in classes):
        raise ConfigError(
            f"evaluation.classes must be class indices in [0, {num_classes - 1}] (got {classes})"
        )


def _check_max_examples(cfg: DictConfig, data: FederatedData) -> None:
    """An honest client's count must pass the reply check."""
    bound = cfg.faults.max_num_examples
    largest = data.largest_client
    if bound is not None and bound < largest:
        raise ConfigError(
            f"faults.max_num_examples must be >= the largest client's {largest} training "
            f"samples, or null (got {bound}): honest replies would be dropped"
        )


def build_strategy(cfg: DictConfig) -> Strategy:
    """The configured Flower strategy with fedsim's cohort sizes and metric aggregation.

    `fraction_*` alone can round down (int(0.29 * 100) == 28), so the `min_*`
    counts pin the cohort to exactly `clients_per_round`, drawn from all clients but the
    held-out new ones (`evaluation.new_clients`). Client evaluations are
    combined by `aggregate_client_evaluations`: Flower's weighted means, plus
    means over clients and per class group. The `privacy` option wraps the strategy
    (central DP's clipping and noise, local DP's accounting) and may set how it weighs
    replies.
    """
    n = training_population(cfg)
    k_eval = cfg.evaluation.clients_per_round
    flwr_log = logging.getLogger("flwr")
    flwr_log.addFilter(_no_evaluation_warning)  # evaluation.clients_per_round=0 is a choice
    privacy = build_privacy(cfg)
    try:
        strategy = instantiate_input(
            cfg.strategy,
            fraction_train=cfg.clients_per_round / n,
            min_train_nodes=cfg.clients_per_round,
            fraction_evaluate=k_eval / n,
            min_evaluate_nodes=k_eval,
            min_available_nodes=n,
            evaluate_metrics_aggr_fn=aggregate_client_evaluations,
            **privacy.inner_settings(),
        )
    finally:
        flwr_log.removeFilter(_no_evaluation_warning)
    return privacy.wrap(strategy, num_sampled_clients=cfg.clients_per_round, population=n,
                        seed=cfg.seed)


def training_population(cfg: DictConfig) -> int:
    """The clients the strategy samples from: all but the held-out new clients."""
    return cfg.num_clients - len(held_out_nodes(cfg.evaluation.get("new_clients", 0.0),
                                                cfg.num_clients))


def build_privacy(cfg: DictConfig) -> NoPrivacy:
    """The configured `privacy` option (none for a config from before the group existed)."""
    return instantiate_input(cfg.privacy) if "privacy" in cfg else NoPrivacy()


def _no_evaluation_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("fraction_evaluate is set to 0.0")


def preflight(cfg: DictConfig) -> tuple[FederatedData, Path]:
    """Every check that can fail on the user's input, before any work starts.

    Config fields, data (samples >= clients, partitions), model-dataset fit and
    the run directory (never an existing run's, unless resuming an unfinished one
    from its checkpoint). Returns the data and the run dir.
    """
    validate(cfg)
    data = build_federated_data(cfg)
    check_trainer(cfg, data)  # before the model: a trainer may extend it from its settings
    check_strategy(cfg)
    check_model_fits(cfg, data)
    _check_reported_classes(cfg, data.num_classes)
    check_devices(cfg, data)
    _check_max_examples(cfg, data)
    if cfg.resume is not None:
        from fedsim.checkpoint import check_checkpoint, check_same_experiment, resumable_run_dir
        from fedsim.run_dir import claim

        run_dir = resumable_run_dir(cfg.resume)
        check_same_experiment(cfg)
        check_checkpoint(cfg, model_factory(cfg, data)())
        return data, claim(run_dir, fresh=False)
    return data, prepare_run_dir(cfg.output_dir)


def check_devices(cfg: DictConfig, data: FederatedData) -> None:
    """Draw the clients' delays once, so that settings that do not fit the data
    (`devices.slow_class`) fail here. Without delays there is nothing to check, and
    reading every client's label counts would draw a resampled population in full."""
    devices = instantiate_input(cfg.devices)
    if not isinstance(devices, NoDelay):
        devices.delays(data.label_counts(), cfg.seed)


def check_strategy(cfg: DictConfig) -> None:
    """Build the strategy once, so that its constructor's checks of its settings fail
    here, before any work, and not when the server starts."""
    from fedsim.engine_strategy import check_round_loop

    try:
        check_round_loop(build_strategy(cfg))
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(f"strategy ({cfg.strategy._target_}) refuses its settings: "
                          f"{str(cause).splitlines()[0]}") from None


#: preflight results of runs this process started, for its own ServerApp (key: the config)
_CHECKED: dict[str, tuple[FederatedData, Path]] = {}


def _run_key(cfg: DictConfig) -> str:
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)


def driver_preflight(cfg: DictConfig) -> tuple[FederatedData, Path]:
    """`preflight`, kept for this process's ServerApp of the same run (see `server_preflight`).
    `forget_preflight` drops it once the run is over, whatever happened."""
    result = preflight(cfg)
    _CHECKED[_run_key(cfg)] = result
    return result


def server_preflight(cfg: DictConfig) -> tuple[FederatedData, Path]:
    """The run's preflight: the one this process's driver did (simulated backends), else a
    fresh one (a ServerApp started by Flower's deployment runtime)."""
    return _CHECKED.pop(_run_key(cfg), None) or preflight(cfg)


def forget_preflight(cfg: DictConfig) -> None:
    _CHECKED.pop(_run_key(cfg), None)


def build_trainer(cfg: DictConfig, data: FederatedData, device: str | None = None) -> Trainer:
    """The configured local trainer (also used by strategies that re-run clients, on
    `device` instead of the configured one). A trainer's own checks of its settings
    raise a `ConfigError`, which comes out as itself."""
    return trainer_for_model(cfg, model_factory(cfg, data), device)


def trainer_for_model(cfg: DictConfig, model_fn: Callable[[], nn.Module],
                      device: str | None = None) -> Trainer:
    """The configured trainer with its configured optimizer, training `model_fn`'s models:
    the one way simulated clients and SuperNodes with their own data build it."""
    dp_sgd = build_privacy(cfg).dp_sgd
    return instantiate_input(
        cfg.client, model_fn=model_fn, seed=cfg.seed, device=device or cfg.device,
        optimizer=instantiate(cfg.optimizer) if "optimizer" in cfg else None,
        **({} if dp_sgd is None else {"dp_sgd": dp_sgd}),
    )


def check_trainer(cfg: DictConfig, data: FederatedData) -> None:
    """Build the trainer and its optimizer once, so that bad client or optimizer settings
    fail here, naming the field, and not in every client."""
    trainer = build_trainer(cfg, data, device="cpu")
    check_finetuning(cfg, type(trainer))
    make_optimizer = getattr(trainer, "make_optimizer", None)
    if make_optimizer is None:
        return
    try:
        make_optimizer([nn.Parameter(torch.zeros(2, 2))], trainer.round_settings(ConfigRecord()))
    except (ValueError, TypeError) as err:
        raise ConfigError(
            f"optimizer ({cfg.optimizer._target_}) refuses its settings (with client.lr="
            f"{cfg.client.get('lr')}, client.weight_decay={cfg.client.get('weight_decay')}): "
            f"{err}"
        ) from None


def check_finetuning(cfg: DictConfig, trainer_cls: type) -> None:
    """`evaluation.finetune_epochs`: an integer >= 0, and a trainer that says which weights
    it evaluates (`SGDTrainer.evaluated_weights`) where it evaluates a model of its own."""
    from fedsim.clients.sgd import SGDTrainer

    epochs = cfg.evaluation.get("finetune_epochs", 0)
    if not (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 0):
        raise ConfigError(f"evaluation.finetune_epochs must be an integer >= 0 (got {epochs!r})")
    if not epochs:
        return
    own_evaluation = issubclass(trainer_cls, SGDTrainer) and (
        trainer_cls.evaluate is not SGDTrainer.evaluate
        or trainer_cls.test_logits is not SGDTrainer.test_logits)
    if not issubclass(trainer_cls, SGDTrainer) or (
            own_evaluation and trainer_cls.evaluated_weights is SGDTrainer.evaluated_weights):
        raise ConfigError(
            f"evaluation.finetune_epochs must be 0 with client {cfg.client._target_} (got "
            f"{epochs}): it evaluates a model of its own without saying which weights "
            "(SGDTrainer.evaluated_weights), so there is nothing to fine-tune")


_RUNTIMES: dict[int, tuple[DictConfig, FederatedData, Trainer]] = {}


def client_runtime(cfg: DictConfig) -> tuple[FederatedData, Trainer]:
    """Data and trainer for the ClientApp in this process, built once per config object.

    Keyed by identity: `from_run_config` returns one read-only object per config
    string, and hashing a DictConfig would render it to text on every message.
    """
    entry = _RUNTIMES.get(id(cfg))
    if entry is None or entry[0] is not cfg:
        torch.set_num_threads(cfg.torch_threads)
        data = build_federated_data(cfg)
        entry = (cfg, data, build_trainer(cfg, data))
        if len(_RUNTIMES) >= 2:  # runs of a sweep replace each other
            _RUNTIMES.pop(next(iter(_RUNTIMES)))
        _RUNTIMES[id(cfg)] = entry
    return entry[1], entry[2]


NODE_DATA_FIELD = "node_config data-path"


@dataclass(frozen=True)
class NodeFileRuntime:
    """What a SuperNode with its own `.npz` file trains with, and its model's shapes."""

    trainer: Trainer
    data: ClientData
    shapes: dict[str, tuple[int, ...]]


_FILE_RUNTIMES: dict[tuple[int, str], tuple[DictConfig, NodeFileRuntime]] = {}


def local_file_runtime(cfg: DictConfig, path: str, partition_id: int) -> NodeFileRuntime:
    """Trainer and data for a SuperNode that holds its own `.npz` file (`data-path`).

    The node never builds the run's dataset: the model's input shape comes from the
    file, and the class count from `dataset.num_classes` when the run sets it, else
    from the file's `num_classes` entry, else from its largest label
    (`check_node_model` catches a count that differs from the server's model).
    """
    key = (id(cfg), path)
    entry = _FILE_RUNTIMES.get(key)
    if entry is None or entry[0] is not cfg:
        from fedsim.datasets.npz import load

        torch.set_num_threads(cfg.torch_threads)
        ratio = cfg.data.client_test_ratio
        splits = load(path, num_classes=cfg.dataset.get("num_classes"),
                      test_fraction=ratio / (1 + ratio) if ratio > 0 else 0.2,
                      split_seed=cfg.seed, field=NODE_DATA_FIELD)
        data = ClientData(
            partition_id=partition_id,
            x_train=torch.from_numpy(splits.x_train), y_train=torch.from_numpy(splits.y_train),
            x_test=torch.from_numpy(splits.x_test), y_test=torch.from_numpy(splits.y_test),
            num_classes=splits.num_classes,
        )
        model_fn = shaped_model_factory(cfg, splits.input_shape, splits.num_classes)
        shapes = {name: tuple(t.shape) for name, t in model_fn().state_dict().items()}
        trainer = trainer_for_model(cfg, model_fn)
        entry = (cfg, NodeFileRuntime(trainer, data, shapes))
        _FILE_RUNTIMES.clear()
        _FILE_RUNTIMES[key] = entry
    return entry[1]


def check_node_model(runtime: NodeFileRuntime, arrays: ArrayRecord, path: str) -> None:
    """Raise a `DataError` when the server's arrays do not fit the model built for the file."""
    for name, array in arrays.items():
        expected = runtime.shapes.get(name)
        if expected is not None and tuple(array.shape) != expected:
            raise DataError(
                f"{NODE_DATA_FIELD} '{path}': the server's '{name}' has shape "
                f"{tuple(array.shape)} but this node's data gives {expected} "
                f"({runtime.data.num_classes} classes); store the run's class count as "
                "num_classes in the file"
            )
