"""Run config: validation before any work, and transport to the Flower apps.

The resolved Hydra config travels to the ServerApp and ClientApps as one JSON
string in Flower's `run_config` (key `fedsim-config`), so simulation and
deployment share a single configuration path. A bare `flwr run` (no
`fedsim-config`) composes the Hydra config from the `overrides` key instead.
"""

from __future__ import annotations

import importlib
import inspect
import json
import shlex
import types
import typing
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedsim.errors import ConfigError, is_number, require
from fedsim.spec import client_uploads

RUN_CONFIG_KEY = "fedsim-config"
OVERRIDES_KEY = "overrides"  # Hydra overrides, e.g. "strategy=fedprox num_rounds=5"
DEPLOYMENT_BACKEND = "fedsim.backends.deployment.DeploymentBackend"
GROUPS = (
    "strategy", "client", "optimizer", "dataset", "partition", "model", "backend", "logger",
    "attack", "devices", "privacy",
)


def to_run_config(cfg: DictConfig) -> dict[str, str | float | int]:
    """Flower `run_config` carrying the resolved fedsim config, and the client settings
    under the names Flower apps read (`context.run_config["local-epochs"]`)."""
    from fedsim.train_config import client_settings

    return {RUN_CONFIG_KEY: json.dumps(OmegaConf.to_container(cfg, resolve=True)),
            **client_settings(cfg.client)}


@lru_cache(maxsize=8)
def _parse(config_json: str) -> DictConfig:
    cfg = OmegaConf.create(json.loads(config_json))
    OmegaConf.set_readonly(cfg, True)
    return cfg


@lru_cache(maxsize=8)
def _compose_overrides(overrides: str) -> DictConfig:
    """The config a bare `flwr run` means: fedsim/conf/ with `backend=deployment` and `overrides`.

    The backend is fixed because these apps are already running on a SuperLink;
    features that need simulation's node ids are then refused, as they must be.
    """
    from hydra.errors import HydraException

    try:
        cfg = compose(["backend=deployment", *shlex.split(overrides)])
    except (HydraException, ValueError) as err:
        raise ConfigError(f"run_config {OVERRIDES_KEY}: {err}") from err
    _require(cfg.backend._target_ == DEPLOYMENT_BACKEND, f"run_config {OVERRIDES_KEY}",
             "free of backend=... (a `flwr run` already runs on a SuperLink)", overrides)
    return _parse(to_run_config(cfg)[RUN_CONFIG_KEY])


def from_run_config(run_config: dict[str, Any], default_json: str | None = None) -> DictConfig:
    """The fedsim config from a Flower `run_config` (parsed once per distinct string).

    `fedsim-config` (what the `fedsim` CLI sends) wins; without it the config is
    composed from `fedsim/conf/` with the `overrides` string, as `flwr run` users pass it.
    """
    config_json = run_config.get(RUN_CONFIG_KEY) or default_json
    if config_json:
        return _parse(str(config_json))
    return _compose_overrides(str(run_config.get(OVERRIDES_KEY, "")))


_require = require  # the one-line message every check below raises


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_is_number = is_number  # finite: no setting takes inf or nan
#: seeds go to numpy's and torch's generators, which take 32 (numpy) / 64 (torch) bits
SEED_MAX = 2**32 - 1
#: a torch thread pool larger than this is a typo, and torch aborts on a huge one
MAX_THREADS = 1024
#: an injected hang sleeps for real: an hour is already far past any round deadline
MAX_HANG_S = 3600


def _check_target(cfg: DictConfig, group: str) -> None:
    node = cfg.get(group)
    _require(isinstance(node, DictConfig) and "_target_" in node, group,
             f"a config group with a _target_ (choose one of fedsim/conf/{group}/*.yaml)", node)
    module_name, _, attr = str(node._target_).rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{group}._target_: cannot import '{module_name}' ({err})") from err
    _require(hasattr(module, attr), f"{group}._target_", f"a name in {module_name}", attr)


#: Arguments fedsim passes itself when it builds a group's object, and where it takes them from:
#: a config key of that name would be overridden or collide, so it is refused.
_SET_BY_FEDSIM = {
    "strategy": ({"fraction_train", "min_train_nodes", "fraction_evaluate", "min_evaluate_nodes",
                  "min_available_nodes", "evaluate_metrics_aggr_fn"},
                 "clients_per_round, num_clients and evaluation.clients_per_round"),
    "client": ({"model_fn", "seed", "device", "optimizer", "dp_sgd"},
               "model, seed, device, optimizer and privacy"),
    "model": ({"input_shape", "num_classes"}, "the dataset"),
    "optimizer": ({"params", "lr", "weight_decay"}, "client.lr and client.weight_decay"),
}

_SIMPLE_TYPES: dict[Any, tuple[Callable[[Any], bool], str, str]] = {
    int: (lambda v: _is_int(v), "an integer", "integers"),
    float: (lambda v: _is_number(v), "a finite number", "finite numbers"),
    bool: (lambda v: isinstance(v, bool), "true or false", "booleans"),
    str: (lambda v: isinstance(v, str), "a string", "strings"),
    type(None): (lambda v: v is None, "null", "nulls"),
}


def _settings(target: Any) -> dict[str, inspect.Parameter] | None:
    """The keyword parameters `target` takes, following `**kwargs` up its base classes (or to
    the class a builder function returns); None when they stay open-ended."""
    chain = list(inspect.getmro(target)) if inspect.isclass(target) else [target]
    params: dict[str, inspect.Parameter] = {}
    while chain:
        owner = chain.pop(0)
        if owner is object:
            return params
        if inspect.isclass(owner) and "__init__" not in vars(owner):
            continue
        try:
            signature = inspect.signature(
                owner.__init__ if inspect.isclass(owner) else owner, eval_str=True)
        except (TypeError, ValueError, NameError):
            return None
        for name, param in signature.parameters.items():
            if name != "self" and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                params.setdefault(name, param)
        if all(p.kind is not p.VAR_KEYWORD for p in signature.parameters.values()):
            return params
        if not inspect.isclass(owner) and inspect.isclass(signature.return_annotation):
            chain = list(inspect.getmro(signature.return_annotation))
    return None


def _expected(annotation: Any) -> tuple[Callable[[Any], bool], str] | None:
    """A check and its wording for a plain annotation (int, str | None, Sequence[int],
    Literal[...]); None for anything else, which is then not checked here."""
    if annotation in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[annotation][:2]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return (lambda v: isinstance(v, str | int) and v in args), f"one of {list(args)}"
    if origin in (typing.Union, types.UnionType):
        parts = [_expected(arg) for arg in args]
        if any(part is None for part in parts):
            return None
        return (lambda v: any(ok(v) for ok, _ in parts)), " or ".join(w for _, w in parts)
    if origin in (list, tuple, Sequence):
        item = _SIMPLE_TYPES.get(args[0]) if args else None
        if item is None:
            return (lambda v: OmegaConf.is_list(v)), "a list"
        return (lambda v: OmegaConf.is_list(v) and all(item[0](x) for x in v)), \
            f"a list of {item[2]}"
    return None


def settings_of(group: str, target: str) -> list[str]:
    """The keys a `group` whose `_target_` is `target` may set (its constructor's keyword
    parameters, less those fedsim passes itself); [] when unknown or open-ended."""
    from hydra.utils import get_object

    try:
        params = _settings(get_object(target))
    except Exception:  # noqa: BLE001 - an unimportable target is reported elsewhere
        return []
    injected = _SET_BY_FEDSIM.get(group, (set(), ""))[0]
    return sorted(set(params or ()) - injected)


def _check_settings(cfg: DictConfig, group: str) -> None:
    """Every key of a group is a parameter of its `_target_` and has the annotated type.

    A key the target lacks would crash its construction (e.g. a preset's
    `partition.alpha` kept when the user picks `partition=iid`); one fedsim passes
    itself would be silently overridden.
    """
    from hydra.utils import get_object

    node, target = cfg[group], str(cfg[group]._target_)
    params = _settings(get_object(target))
    injected, source = _SET_BY_FEDSIM.get(group, (set(), ""))
    for key in node:
        if str(key).startswith("_") or OmegaConf.is_missing(node, key):
            continue  # a missing value is reported as such by `validate`
        field = f"{group}.{key}"
        _require(key not in injected, field, f"left unset (fedsim sets it from {source})",
                 node[key])
        if params is None:
            continue
        if key not in params:
            names = ", ".join(sorted(set(params) - injected)) or "none"
            raise ConfigError(
                f"{field} is not a setting of {group} {target} (its settings: {names}); if a "
                f"preset (+experiment=...) set it for another {group} option, drop it with "
                f"~{field}" + (f"; for a module of your own, start from model=custom "
                               f"model._target_={target}" if group == "model" else ""))
        expected = _expected(params[key].annotation)
        if expected is not None:
            _require(expected[0](node[key]), field, expected[1], node[key])


#: run-wide maps whose entries are the user's own (see `_validate_messages`)
OPEN_MAPS = ("train_config", "evaluate_config")


@lru_cache(maxsize=1)
def _base_config() -> DictConfig:
    return OmegaConf.load(Path(CONF_DIR) / "config.yaml")


def _check_known_keys(cfg: DictConfig) -> None:
    """Keys outside the groups are fedsim/conf/config.yaml's: `+num_client=5` would otherwise be
    accepted and ignored."""
    base = _base_config()
    known = [k for k in base if k not in ("defaults", "hydra")]
    for key in cfg:
        if key in GROUPS or key == "hydra":
            continue
        if key in OPEN_MAPS:  # any entry: what the user's messages carry
            continue
        if key not in known:
            raise ConfigError(f"{key} is not a fedsim setting (the settings outside the "
                              f"groups: {', '.join(known)})")
        if OmegaConf.is_dict(base[key]):
            if not OmegaConf.is_dict(cfg[key]):  # `plots=null`: a section, not a value
                raise ConfigError(f"{key} must be a section of settings ({', '.join(base[key])}"
                                  f"), set one at a time ({key}.<setting>=...); got {cfg[key]!r}")
            for sub in cfg[key]:
                if sub not in base[key]:
                    raise ConfigError(f"{key}.{sub} is not a fedsim setting (the {key} "
                                      f"settings: {', '.join(base[key])})")


def _check_no_key_missing(cfg: DictConfig) -> None:
    """Every setting of fedsim/conf/config.yaml and every group is there: `~seed` would
    otherwise fail later as a broken interpolation somewhere else (`partition.seed`). A
    resumed run's stored config may predate newer settings; it is checked as it is."""
    if cfg.get("resume") is not None:
        return
    base = _base_config()
    for key in [*(k for k in base if k not in ("defaults", "hydra")), *GROUPS]:
        _require(key in cfg, str(key), "kept (a fedsim setting cannot be removed with "
                 f"~{key}; set it instead)", f"~{key}")


#: Hydra's instantiation keys a group may set, with the values fedsim's construction allows
_HYDRA_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "_target_": (lambda v: isinstance(v, str), "a dotted import path"),
    "_recursive_": (lambda v: isinstance(v, bool), "true or false"),
    "_convert_": (lambda v: v in ("none", "partial", "object", "all"),
                  "one of none, partial, object, all"),
    "_partial_": (lambda v: isinstance(v, bool), "true or false"),
}


def _check_hydra_keys(node: DictConfig, group: str) -> None:
    """A group's `_..._` keys are Hydra's, with values Hydra takes; the optimizer is built
    later with the model's parameters, so it must stay a partial."""
    for key in node:
        if not str(key).startswith("_"):
            continue
        check = _HYDRA_KEYS.get(str(key))
        _require(check is not None, f"{group}.{key}",
                 f"one of Hydra's keys ({', '.join(_HYDRA_KEYS)}), or a setting without a "
                 "leading underscore", node[key])
        _require(check[0](node[key]), f"{group}.{key}", check[1], node[key])
    if group == "optimizer":
        _require(node.get("_partial_") is True, "optimizer._partial_",
                 "true (fedsim builds the optimizer once it has the model's parameters)",
                 node.get("_partial_"))


def _check_interpolations(cfg: DictConfig) -> None:
    """Every `${...}` resolves (a bad one would otherwise fail deep inside a run). Run-wide
    keys go first: the groups interpolate them (`partition.seed: ${seed}`)."""
    from omegaconf.errors import OmegaConfBaseException

    for key in sorted(cfg, key=lambda k: k in GROUPS):
        try:
            value = None if OmegaConf.is_missing(cfg, key) else cfg[key]
            if OmegaConf.is_config(value):
                OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException as err:
            field = getattr(err, "full_key", None) or key
            raise ConfigError(f"{field}: {str(err).splitlines()[0]}") from None


def _validate_messages(cfg: DictConfig) -> None:
    """`train_config` / `evaluate_config` hold what a Flower record carries; `client_app`
    names an importable ClientApp."""
    from fedsim.train_config import message_config

    for field in OPEN_MAPS:
        node = cfg.get(field)
        _require(OmegaConf.is_dict(node), field, "a map of message config entries", node)
        message_config(OmegaConf.to_container(node, resolve=True), field)
    if cfg.get("client_app") is not None:
        from fedsim.flower_apps import load_client_app

        _require(isinstance(cfg.client_app, str), "client_app",
                 "module:attribute naming a Flower ClientApp, or null", cfg.client_app)
        load_client_app(cfg.client_app)


def _validate_upload_pairing(cfg: DictConfig) -> None:
    """The trainer must upload what the strategy aggregates: weights, deltas or rankings."""
    from hydra.utils import get_class

    from fedsim.hooks import expects_uploads

    expects = expects_uploads(get_class(cfg.strategy._target_))
    if cfg.get("client_app"):
        _require(expects == "weights", "strategy",
                 f"one that averages weights (fedavg, fedprox, fedadam, ...): client_app="
                 f"{cfg.client_app} is a Flower ClientApp, which uploads trained weights, while "
                 f"{cfg.strategy._target_} aggregates {expects}", str(cfg.strategy._target_))
        return
    uploads = client_uploads(cfg)
    _require(uploads == expects, "client",
             f"a trainer that uploads {expects}, as strategy {cfg.strategy._target_} expects "
             f"(client {cfg.client._target_} uploads {uploads}; use the method's own client "
             "group, or method=<name>, which pairs them)",
             str(cfg.client._target_))


def _validate_model_pairing(cfg: DictConfig) -> None:
    """A method built around its own network (NoProp, ForwardGNN) runs with that model, and
    such a model only with its method."""
    from hydra.utils import get_class, get_object

    required = getattr(get_class(cfg.client._target_), "required_model", None)
    model = str(cfg.model._target_)
    if required is not None:
        _require(model == required, "model", f"{required} for client {cfg.client._target_}",
                 model)
    trained_by = getattr(get_object(model), "trained_by", None)  # a class or a builder
    if trained_by is not None:
        _require(str(cfg.client._target_) == trained_by, "client",
                 f"{trained_by} for model {model} (it only trains with its own method)",
                 str(cfg.client._target_))


def validate(cfg: DictConfig) -> None:
    """Check every field before any work; raise one `ConfigError` naming it.

    Run-wide fields first, so that a bad `seed` or `num_clients` is reported as
    itself and not as the group key that interpolates it.
    """
    _check_no_key_missing(cfg)
    _check_interpolations(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    _require(not missing, missing[0] if missing else "", "set (it has no default)", "???")
    _check_known_keys(cfg)
    _validate_run(cfg)
    for group in GROUPS:
        _check_target(cfg, group)
        _check_hydra_keys(cfg[group], group)
    for group in GROUPS:
        _check_settings(cfg, group)
    _validate_messages(cfg)
    _validate_upload_pairing(cfg)
    _validate_model_pairing(cfg)
    _validate_dataset(cfg)
    _validate_partition(cfg)
    _validate_model(cfg)
    _validate_optimizer(cfg)
    _build_self_checking_groups(cfg)
    _validate_evaluation_and_devices(cfg)
    _validate_faults(cfg)


def _positive(value: Any) -> bool:
    return _is_number(value) and value > 0


def _non_negative(value: Any) -> bool:
    return _is_number(value) and value >= 0


def _below_one(value: Any) -> bool:
    """In [0, 1): momenta, decays, sparsities."""
    return _is_number(value) and 0 <= value < 1


def _open_unit(value: Any) -> bool:
    return _is_number(value) and 0 < value < 1


def _count(value: Any) -> bool:
    return _is_int(value) and value >= 1


def _seed_value(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= SEED_MAX


def _natural(value: Any) -> bool:
    """An integer >= 0 (a count that may be 0; seeds are `_seed_value`)."""
    return _is_int(value) and value >= 0


SEEDS = f"an integer in [0, {SEED_MAX}]"


def _check_each(node: DictConfig, group: str, keys: tuple[str, ...],
                ok: Callable[[Any], bool], allowed: str) -> None:
    """`_require` for each of `keys` that `node` has (group options differ in their keys)."""
    for key in keys:
        if key in node:
            _require(ok(node[key]), f"{group}.{key}", allowed, node[key])


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _validate_run(cfg: DictConfig) -> None:
    """The run-wide fields of fedsim/conf/config.yaml (faults, checkpoints: `_validate_faults`)."""
    _require(_seed_value(cfg.seed), "seed", SEEDS, cfg.seed)
    _require(_is_int(cfg.num_clients) and cfg.num_clients >= 1, "num_clients",
             "an integer >= 1", cfg.num_clients)
    _require(_is_int(cfg.clients_per_round) and 1 <= cfg.clients_per_round <= cfg.num_clients,
             "clients_per_round", f"an integer in [1, num_clients={cfg.num_clients}]",
             cfg.clients_per_round)
    _require(_is_int(cfg.num_rounds) and cfg.num_rounds >= 1, "num_rounds",
             "an integer >= 1", cfg.num_rounds)
    evaluation = cfg.evaluation
    _require(_is_int(evaluation.server_every) and evaluation.server_every >= 0,
             "evaluation.server_every", "an integer >= 0 (0 = never)", evaluation.server_every)
    _require(_is_int(evaluation.clients_per_round)
             and 0 <= evaluation.clients_per_round <= cfg.num_clients,
             "evaluation.clients_per_round", f"an integer in [0, num_clients={cfg.num_clients}]",
             evaluation.clients_per_round)
    imbalance = cfg.data.imbalance_factor
    _require(_is_number(imbalance) and 0 < imbalance <= 1,
             "data.imbalance_factor", "a number in (0, 1] (1 = no long tail)", imbalance)
    ratio = cfg.data.client_test_ratio
    _require(_non_negative(ratio), "data.client_test_ratio", "a number >= 0", ratio)
    _require(ratio > 0 or evaluation.clients_per_round == 0, "data.client_test_ratio",
             "> 0 while evaluation.clients_per_round > 0 (clients need test samples)", ratio)
    device = str(cfg.device)
    _require(device in ("auto", "cpu") or device.split(":")[0] == "cuda", "device",
             "auto, cpu, cuda or cuda:<index>", cfg.device)
    if device.startswith("cuda"):
        import torch

        _require(torch.cuda.is_available(), "device", "auto or cpu (this machine has no CUDA)",
                 cfg.device)
    _require(_is_int(cfg.torch_threads) and 1 <= cfg.torch_threads <= MAX_THREADS,
             "torch_threads", f"an integer in [1, {MAX_THREADS}]", cfg.torch_threads)
    _require(isinstance(cfg.progress, bool), "progress", "true or false", cfg.progress)
    _require(cfg.flwr_log_level in LOG_LEVELS, "flwr_log_level", f"one of {list(LOG_LEVELS)}",
             cfg.flwr_log_level)
    _require(cfg.output_dir is None or (isinstance(cfg.output_dir, str) and cfg.output_dir != ""),
             "output_dir", "a directory path, or null", cfg.output_dir)
    enabled = OmegaConf.select(cfg, "plots.enabled", default=True)  # older runs: plotted
    _require(isinstance(enabled, bool), "plots.enabled", "true or false", enabled)
    metrics = OmegaConf.select(cfg, "plots.metrics", default=OmegaConf.create([]))  # older runs
    _require(OmegaConf.is_list(metrics) and all(isinstance(m, str) and m for m in metrics),
             "plots.metrics", "a list of metrics.jsonl keys or patterns (e.g. "
             "[server/accuracy-tail, 'server/accuracy-class-*'])", metrics)


def _validate_dataset(cfg: DictConfig) -> None:
    """Loader arguments in range, before any data is read or generated."""
    dataset = cfg.dataset
    _check_each(dataset, "dataset", ("path", "repo", "image_key", "label_key"),
                lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")
    _check_each(dataset, "dataset", ("test_fraction", "train_split"), _open_unit,
                "a number in (0, 1)")
    _check_each(dataset, "dataset", ("split_seed", "data_seed"), _seed_value, SEEDS)
    _check_each(dataset, "dataset", ("num_samples",), lambda v: _is_int(v) and v >= 2,
                "an integer >= 2")
    _check_each(dataset, "dataset", ("num_features", "num_informative"), _count,
                "an integer >= 1")
    _check_each(dataset, "dataset", ("class_sep",), _positive, "a number > 0")
    if dataset.get("num_classes") is not None:
        _require(_is_int(dataset.num_classes) and dataset.num_classes >= 2, "dataset.num_classes",
                 "an integer >= 2" + (", or null (from the labels)" if "path" in dataset else ""),
                 dataset.num_classes)
    if "num_informative" in dataset:  # synthetic: scikit-learn's make_classification limits
        _require(dataset.num_informative <= dataset.num_features, "dataset.num_informative",
                 f"at most dataset.num_features={dataset.num_features}", dataset.num_informative)
        _require(dataset.num_classes <= 2**dataset.num_informative, "dataset.num_classes",
                 f"at most 2 ** dataset.num_informative = {2**dataset.num_informative} (one "
                 "hypercube vertex per class)", dataset.num_classes)
    if "train_split" in dataset:  # mnist1d: num_samples // 10 samples of each of 10 classes
        total = dataset.num_samples // 10 * 10
        _require(0 < int(total * dataset.train_split) < total, "dataset.num_samples",
                 f"large enough for a train and a test split at dataset.train_split="
                 f"{dataset.train_split} (mnist1d makes num_samples // 10 samples per class)",
                 dataset.num_samples)


def _validate_partition(cfg: DictConfig) -> None:
    """Partitioner arguments; those that depend on the data are checked where it is built
    (`fedsim.datasets.federated.check_partition_fits`)."""
    from fedsim.datasets.partition import LABEL, NATURAL_ID

    partition = cfg.partition
    if "alpha" in partition:
        alpha = partition.alpha
        values = list(alpha) if OmegaConf.is_list(alpha) else [alpha]
        _require(all(_positive(a) for a in values), "partition.alpha",
                 "a number > 0 (or a list of them)", alpha)
        _require(len(values) in (1, cfg.num_clients), "partition.alpha",
                 f"a number > 0 or a list of num_clients={cfg.num_clients} of them", alpha)
    if "num_partitions" in partition:
        _require(partition.num_partitions == cfg.num_clients, "partition.num_partitions",
                 f"equal to num_clients={cfg.num_clients}", partition.num_partitions)
    if "partition_by" in partition:
        column = NATURAL_ID if str(partition._target_).endswith("NaturalIdPartitioner") else LABEL
        _require(partition.partition_by == column, "partition.partition_by",
                 f"{column} for {partition._target_}", partition.partition_by)
    _check_each(partition, "partition", ("num_classes_per_partition",), _count,
                "an integer >= 1")
    _check_each(partition, "partition", ("min_partition_size",), _natural, "an integer >= 0")
    _check_each(partition, "partition", ("seed",), lambda v: v is None or _seed_value(v),
                f"{SEEDS}, or null")
    _check_each(partition, "partition", ("num_shards_per_partition", "shard_size"),
                lambda v: v is None or _count(v), "an integer >= 1, or null")
    if "shard_size" in partition:
        _require(partition.shard_size is not None
                 or partition.get("num_shards_per_partition") is not None,
                 "partition.num_shards_per_partition", "set when partition.shard_size is null",
                 None)


def _validate_model(cfg: DictConfig) -> None:
    """Sizes, seeds and fractions of the model; a model's own error would not name them."""
    model = cfg.model
    _check_each(model, "model", ("channels", "hidden"),
                lambda v: _count(v) or (OmegaConf.is_list(v) and all(_count(x) for x in v)),
                "an integer >= 1 (a list of them where the model takes one per layer)")
    _check_each(model, "model", ("num_layers", "kernel_size", "width", "depth", "num_blocks"),
                _count, "an integer >= 1")
    _check_each(model, "model", ("seed", "class_seed"), _seed_value, SEEDS)
    _check_each(model, "model", ("sparsity",), _below_one,
                "a number in [0, 1) (the share of edges masked)")


def _validate_optimizer(cfg: DictConfig) -> None:
    """Optimizer settings in range (its lr and weight decay are client.lr, client.weight_decay)."""
    optimizer = cfg.optimizer
    if "betas" in optimizer:
        betas = optimizer.betas
        _require(OmegaConf.is_list(betas) and len(betas) >= 2 and all(_below_one(b) for b in betas),
                 "optimizer.betas", "a list [beta1, beta2] of numbers in [0, 1)", betas)
    if "momentum" in optimizer and not OmegaConf.is_interpolation(optimizer, "momentum"):
        # ${client.momentum} is checked by the trainer, under its own name
        _check_each(optimizer, "optimizer", ("momentum",), _below_one, "a number in [0, 1)")
    _check_each(optimizer, "optimizer", ("eps", "wd_ratio"), _non_negative, "a number >= 0")
    _check_each(optimizer, "optimizer", ("delta", "scale"), _positive, "a number > 0")
    _check_each(optimizer, "optimizer", ("update_proj_gap",), _count, "an integer >= 1")
    _check_each(optimizer, "optimizer", ("nesterov",), lambda v: isinstance(v, bool),
                "true or false")


def _validate_evaluation_and_devices(cfg: DictConfig) -> None:
    """Reported classes, and the device model's own checks of its settings, before any data
    (what it needs of the strategy is its `check(spec)`)."""
    from fedsim.datasets.federated import instantiate_input

    classes = cfg.evaluation.get("classes", [])
    _require(OmegaConf.is_list(classes) and all(_is_int(c) and c >= 0 for c in classes),
             "evaluation.classes", "a list of class indices >= 0", classes)
    _validate_new_clients(cfg)
    instantiate_input(cfg.devices)


def _validate_new_clients(cfg: DictConfig) -> None:
    """Held-out clients: a share that leaves a full cohort to train and evaluate, on a
    backend whose node ids name partitions."""
    from hydra.utils import get_class

    share, n = cfg.evaluation.get("new_clients", 0.0), cfg.num_clients
    _require(_is_number(share) and 0 <= share < 1, "evaluation.new_clients",
             "a share of clients in [0, 1)", share)
    if share == 0:
        return
    held = round(share * n)
    available = n - held
    _require(held >= 1, "evaluation.new_clients",
             f"0, or at least 1 / num_clients = {1 / n:g} (it holds out no client)", share)
    _require(available >= max(cfg.clients_per_round, cfg.evaluation.clients_per_round),
             "evaluation.new_clients", f"at most {1 - cfg.clients_per_round / n:g} here: the "
             f"{available} clients left must fill clients_per_round={cfg.clients_per_round} "
             f"and evaluation.clients_per_round={cfg.evaluation.clients_per_round}", share)
    _require(getattr(get_class(cfg.backend._target_), "partition_node_ids", False),
             "evaluation.new_clients", "0 on this backend (held-out clients are found by node "
             "id: backend=inprocess or ray)", share)


def _validate_faults(cfg: DictConfig) -> None:
    """The round's tolerance (min replies, deadline, example bound), injected faults and
    checkpoints; what needs simulated nodes is refused on other backends."""
    from hydra.utils import get_class

    faults, k = cfg.faults, cfg.clients_per_round
    _require(_is_int(faults.min_replies) and 1 <= faults.min_replies <= k, "faults.min_replies",
             f"an integer in [1, clients_per_round={k}]", faults.min_replies)
    _require(_count(faults.max_skipped_rounds), "faults.max_skipped_rounds", "an integer >= 1",
             faults.max_skipped_rounds)
    _require(faults.timeout_s is None or (_is_number(faults.timeout_s)
                                          and 0 < faults.timeout_s < float("inf")),
             "faults.timeout_s", "a finite number of seconds > 0, or null (wait for every "
             "reply)", faults.timeout_s)
    _require(faults.max_num_examples is None or _count(faults.max_num_examples),
             "faults.max_num_examples", "an integer >= 1, or null (the dataset's size)",
             faults.max_num_examples)
    for key in ("crash_prob", "nan_prob", "hang_prob"):
        _require(_is_number(faults[key]) and 0 <= faults[key] <= 1, f"faults.{key}",
                 "a probability in [0, 1]", faults[key])
    _require(faults.crash_prob + faults.nan_prob <= 1, "faults.nan_prob",
             f"at most 1 - faults.crash_prob = {1 - faults.crash_prob:g} (one fault per message)",
             faults.nan_prob)
    _require(_non_negative(faults.hang_s) and faults.hang_s <= MAX_HANG_S, "faults.hang_s",
             f"a number of seconds in [0, {MAX_HANG_S}] (a simulated hang really sleeps)",
             faults.hang_s)
    _require(faults.hang_prob == 0 or faults.hang_s > 0, "faults.hang_s",
             f"> 0 with faults.hang_prob={faults.hang_prob} (how long a client hangs)",
             faults.hang_s)
    kill = faults.kill_worker_round
    if kill is not None:
        _require(_is_int(kill) and 1 <= kill <= cfg.num_rounds, "faults.kill_worker_round",
                 f"a round in [1, num_rounds={cfg.num_rounds}], or null", kill)
        _require(getattr(get_class(cfg.backend._target_), "worker_processes", False),
                 "backend", "a backend with worker processes (ray) for "
                 "faults.kill_worker_round", str(cfg.backend._target_))
    every = cfg.checkpoint.every
    _require(_natural(every), "checkpoint.every", "an integer >= 0 (0 = never)", every)
    if cfg.resume is not None:
        _require(isinstance(cfg.resume, str) and cfg.resume != "", "resume",
                 "the path of a run directory, or null", cfg.resume)
        _require(cfg.output_dir in (None, cfg.resume), "output_dir",
                 f"the resumed run's directory {cfg.resume!r} or null", cfg.output_dir)
        _require(getattr(get_class(cfg.backend._target_), "resumable", False),
                 "backend", "inprocess, ray or deployment to resume a run (under Flower's "
                 "own engine fedsim holds no server state to checkpoint)",
                 str(cfg.backend._target_))


def _build_self_checking_groups(cfg: DictConfig) -> None:
    """Build the backend, logger and attack once: each checks its own settings on
    construction (no I/O); what the attack needs of other groups is its `check(spec)`."""
    from fedsim.datasets.federated import instantiate_input

    for group in ("backend", "logger", "attack"):
        instantiate_input(cfg[group])


CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # inside the package: any install


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The fedsim config with command-line style overrides, without launching Hydra's CLI.

    For scripts and tests: `compose(["strategy=fedprox", "output_dir=/some/dir"])`.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
