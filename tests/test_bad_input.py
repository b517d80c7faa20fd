"""Bad input is refused by `preflight` before any work, as one error naming the field.

Every case runs `preflight` only (no training) and checks the error's type, that
its message names the field and what is allowed, and that the run directory was
not created. Cases already in test_config.py are not repeated here.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pytest

from fedsim.config import CONF_DIR, GROUPS, _check_settings, compose
from fedsim.errors import ConfigError, DataError
from fedsim.runtime import preflight


def refused(cfg, error: type[Exception]) -> str:
    """The message of the `error` that `preflight(cfg)` raises; nothing may be written."""
    with pytest.raises(error) as caught:
        preflight(cfg)
    assert not Path(cfg.output_dir).exists(), "preflight wrote the run directory"
    return str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "field", "allowed"),
    [
        # run-wide fields
        (["progress=x"], "progress", "true or false"),
        (["flwr_log_level=LOUD"], "flwr_log_level", "'WARNING'"),
        (["data.client_test_ratio=true"], "data.client_test_ratio", "a number >= 0"),
        (["num_clients=x"], "num_clients", "an integer >= 1"),  # not partition.num_partitions
        (["seed=${nope}"], "seed", "'nope' not found"),
        (["+num_client=5"], "num_client", "num_clients"),
        (["+evaluation.every=2"], "evaluation.every", "server_every"),
        # the issue-25 battery: finite, in range, and Hydra's own keys
        (["seed=99999999999999999999"], "seed", "an integer in [0, 4294967295]"),
        (["seed=nan"], "seed", "an integer in [0, 4294967295]"),
        (["torch_threads=100000000"], "torch_threads", "an integer in [1, 1024]"),
        (["client.lr=inf"], "client.lr", "a finite number"),
        (["client.lr=nan"], "client.lr", "a finite number"),
        (["client.local_epochs=99999999999999999999"], "client.local_epochs",
         "an integer in [1, 10000]"),
        (["partition=dirichlet", "partition.alpha=inf"], "partition.alpha", "a number > 0"),
        (["faults.crash_prob=nan"], "faults.crash_prob", "a probability in [0, 1]"),
        (["optimizer._partial_=false"], "optimizer._partial_", "true"),
        (["+strategy._recursive_=7"], "strategy._recursive_", "true or false"),
        (["+client._foo_=1"], "client._foo_", "one of Hydra's keys"),
        (["~seed"], "seed", "kept"),
        (["~partition"], "partition", "kept"),
        # types and names from the group's target
        (["client.lr=true"], "client.lr", "a finite number"),
        (["client.lr_decay=x"], "client.lr_decay", "a finite number"),
        (["client.cosine_epochs=x"], "client.cosine_epochs", "true or false"),
        (["+client.lrr=0.1"], "client.lrr", "its settings: batch_size"),
        (["+optimizer.lr=0.1"], "optimizer.lr", "client.lr"),
        (["+strategy.fraction_train=0.5"], "strategy.fraction_train", "clients_per_round"),
        (["model=cnn1d", "model.channels=[1,2]"], "model.channels", "an integer"),
        (["logger=wandb", "logger.tags=x"], "logger.tags", "a list of strings or null"),
        (["backend=ray", "backend.address=5"], "backend.address", "a string or null"),
        (["strategy=stale", "devices=random", "devices.round_to_int=x"],
         "devices.round_to_int", "true or false"),
        (["strategy=stale", "devices=slow_class", "devices.slow_class=true"],
         "devices.slow_class", "an integer"),
        (["partition=pathological", "partition.class_assignment_mode=x"],
         "partition.class_assignment_mode", "'random'"),
        # ranges
        (["client.lr_decay=-1"], "client.lr_decay", "a number > 0"),
        (["client.momentum=1.5"], "client.momentum", "[0, 1)"),
        (["optimizer=adam", "optimizer.betas=[1,2]"], "optimizer.betas", "[0, 1)"),
        (["optimizer=adam", "optimizer.eps=-1"], "optimizer.eps", ">= 0"),
        (["optimizer=adamp", "optimizer.nesterov=1"], "optimizer.nesterov", "true or false"),
        (["dataset=synthetic", "dataset.class_sep=0"], "dataset.class_sep", "a number > 0"),
        (["strategy=fedavgm", "strategy.server_momentum=1.5"], "strategy.server_momentum",
         "[0, 1)"),
        (["strategy=fedadam", "strategy.eta=0"], "strategy.eta", "> 0"),
        (["strategy=fedtrimmedavg", "strategy.beta=0.5"], "strategy.beta", "[0, 0.5)"),
        (["strategy=fedprox", "strategy.proximal_mu=-1"], "strategy.proximal_mu", ">= 0"),
        (["model.hidden=[0]"], "model.hidden", "an integer >= 1"),
        (["model=cnn1d", "model.kernel_size=0"], "model.kernel_size", "an integer >= 1"),
        (["model=supermask_mlp", "model.sparsity=1"], "model.sparsity", "[0, 1)"),
        (["strategy=fedtrimmedavg", "attack=tailored", "num_clients=10",
          "attack.tolerance=0"], "attack.tolerance", "> 0"),
        (["dataset=synthetic", "dataset.test_fraction=1.5"], "dataset.test_fraction", "(0, 1)"),
        (["dataset=digits", "dataset.split_seed=-1"], "dataset.split_seed", "[0, 4294967295]"),
        (["dataset=mnist1d", "dataset.num_samples=x"], "dataset.num_samples", "an integer"),
        (["dataset=mnist1d", "dataset.train_split=0"], "dataset.train_split", "(0, 1)"),
        (["dataset=npz", "dataset.path=[1,2]"], "dataset.path", "a string"),
        (["dataset=npz", "dataset.path=x.npz", "dataset.num_classes=1"], "dataset.num_classes",
         "an integer >= 2"),
        (["partition=dirichlet", "partition.seed=-1"], "partition.seed", "[0, 4294967295]"),
        (["partition=dirichlet", "partition.min_partition_size=x"],
         "partition.min_partition_size", "an integer"),
        (["partition=dirichlet", "partition.partition_by=x"], "partition.partition_by",
         "label"),
        (["partition=shard", "partition.num_shards_per_partition=0"],
         "partition.num_shards_per_partition", "an integer >= 1, or null"),
        (["partition=shard", "partition.num_shards_per_partition=null"],
         "partition.num_shards_per_partition", "set when partition.shard_size is null"),
        # cross-field rules
        (["dataset=synthetic", "dataset.num_informative=30"], "dataset.num_informative",
         "at most dataset.num_features=20"),
        (["dataset=synthetic", "dataset.num_informative=3"], "dataset.num_classes",
         "2 ** dataset.num_informative = 8"),
        (["dataset=mnist1d", "dataset.num_samples=5"], "dataset.num_samples",
         "large enough for a train and a test split"),
        (["partition=dirichlet", "partition.alpha=[1,2]"], "partition.alpha",
         "a list of num_clients=6"),
    ],
)
def test_a_bad_field_is_named_with_what_is_allowed(tiny_cfg, overrides, field, allowed):
    message = refused(tiny_cfg(*overrides), ConfigError)
    assert message.startswith(f"{field} ") or message.startswith(f"{field}:"), message
    assert allowed in message, message


@pytest.mark.parametrize(
    ("overrides", "field", "allowed"),
    [
        (["partition=shard", "partition.num_shards_per_partition=1000"],
         "partition.num_shards_per_partition", "needs 6000 training samples, and there are 4000"),
        (["partition=shard", "partition.shard_size=1000"], "partition.shard_size",
         "needs 12000 training samples"),
        (["partition=pathological", "partition.num_classes_per_partition=11"],
         "partition.num_classes_per_partition", "at most the dataset's 10 classes"),
        (["partition=dirichlet", "partition.min_partition_size=1000"],
         "partition.min_partition_size", "at most 666"),
        (["partition=natural"], "partition=natural", "an 'ids' array"),
        (["strategy=stale", "devices=slow_class", "devices.slow_class=10"],
         "devices.slow_class", "a class index in [0, 9]"),
        # the issue-25 battery: finite, but absurd for this data
        (["data.imbalance_factor=1e-300"], "data.imbalance_factor", "at least 1/"),
        (["data.client_test_ratio=1e6"], "data.client_test_ratio", "at most"),
        (["num_clients=20", "partition=dirichlet", "partition.alpha=1e-9"], "partition:",
         "raise partition.alpha"),
        (["strategy=bulyan"], "clients_per_round", ">= 4 * strategy.num_malicious_nodes + 3"),
    ],
)
def test_partition_settings_that_do_not_fit_the_data_are_named(tiny_cfg, overrides, field,
                                                                allowed):
    message = refused(tiny_cfg(*overrides), ConfigError)
    assert message.startswith(field) and allowed in message, message


def test_a_preset_key_of_another_group_option_is_named_with_the_way_out(tiny_cfg):
    """fedld_mnist1d sets partition.alpha for Dirichlet; with partition=iid it is refused
    by name (not a Hydra TypeError), and `~partition.alpha` runs."""
    message = refused(tiny_cfg("+experiment=fedld_mnist1d", "partition=iid"), ConfigError)
    assert message.startswith("partition.alpha is not a setting of partition "
                              "flwr_datasets.partitioner.IidPartitioner (its settings: "
                              "num_partitions)")
    assert "~partition.alpha" in message
    preflight(tiny_cfg("+experiment=fedld_mnist1d", "partition=iid", "~partition.alpha"))


def test_the_staleness_preset_runs_with_another_devices_option(tiny_cfg):
    """The preset leaves devices=slow_class's keys to that option, so devices=none works."""
    cfg = tiny_cfg("+experiment=staleness", "devices=none", "strategy=fedavg",
                   "evaluation.clients_per_round=0")
    assert "slow_class" not in cfg.devices
    preflight(cfg)


@pytest.mark.parametrize("option", sorted(glob.glob(f"{CONF_DIR}/*/*.yaml")))
def test_every_shipped_group_option_passes_its_own_settings_check(option):
    group = Path(option).parent.name
    own_target = ["model._target_=fedsim.models.MLP"] if option.endswith("model/custom.yaml") \
        else []  # the option for a module of one's own names none
    if group in GROUPS:
        _check_settings(compose([f"{group}={Path(option).stem}", *own_target]), group)


# --- data files (dataset=npz) ---------------------------------------------------------------

def _good_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.normal(size=(30, 4)), "y_train": np.arange(30) % 3,
        "x_test": rng.normal(size=(9, 4)), "y_test": np.arange(9) % 3,
    }


def _with(**changes) -> dict[str, np.ndarray]:
    arrays = _good_arrays()
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


def _xy(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": x, "y": y}


NAN_X = np.random.default_rng(0).normal(size=(30, 4))
NAN_X[3, 1] = np.nan
INF_X = NAN_X.copy()
INF_X[3, 1] = np.inf


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        (_with(y_test=None), "expected arrays x_train, y_train, x_test, y_test (or x, y)"),
        (_xy(np.zeros((10, 2)), np.arange(9) % 2), "x has 10 samples but y has 9"),
        (_with(y_train=np.zeros(29)), "x_train has 30 samples but y_train has 29"),
        (_with(y_train=np.zeros((30, 2))), "y_train must be a 1-D array of class ids"),
        (_with(y_train=np.where(np.arange(30) == 4, np.nan, 1.0)), "y_train contains NaN or Inf"),
        (_xy(np.zeros((10, 2)), np.where(np.arange(10) == 2, np.inf, 0.0)),
         "y contains NaN or Inf labels"),
        (_with(y_test=np.array([0, 1, 2, -1, 0, 1, 2, 0, 1])), "y_test labels must lie in [0, 2]"),
        (_with(y_train=np.full(30, 1.5)), "y_train contains non-integer labels"),
        (_with(num_classes=np.array(2)), "y_train labels must lie in [0, 1], got [0, 2]"),
        (_with(y_train=np.array(["a"] * 30)), "y_train must hold integer class ids"),
        (_with(x_train=NAN_X), "x_train contains NaN or Inf values"),
        (_with(x_train=INF_X), "x_train contains NaN or Inf values"),
        (_with(x_train=np.zeros((0, 4)), y_train=np.zeros(0, dtype=int)),
         "the train split is empty"),
        (_xy(np.zeros((0, 4)), np.zeros(0, dtype=int)), "leaves the train or the test split empty"),
        (_with(x_test=np.zeros((9, 5))), "x_train samples have shape (4,) but x_test samples "
                                         "have shape (5,)"),
        (_with(x_train=np.zeros(30)), "x_train must have one row per sample"),
        (_with(x_train=np.full((30, 4), "a")), "x_train must hold numbers"),
        (_with(x_train=np.array([[object()]] * 30, dtype=object)), "is not a readable .npz file"),
        (_with(num_classes=np.array([3, 4])), "num_classes must be a single integer >= 1"),
        (_with(ids=np.arange(5)), "train_ids must have one id per training sample"),
        (_with(y_train=np.where(np.arange(30) == 0, 1_000_000, np.arange(30) % 3)),
         "1000001 classes (labels 0..1000000) is more classes than the 39 samples"),
    ],
)
def test_a_bad_data_file_is_named_with_the_problem(tmp_path, tiny_cfg, arrays, problem):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    message = refused(tiny_cfg("dataset=npz", f"dataset.path={path}"), DataError)
    assert message.startswith(f"dataset.path {path}") or message.startswith("dataset.path:")
    assert str(path) in message and problem in message, message


def test_a_file_that_is_not_an_npz_is_named(tmp_path, tiny_cfg):
    path = tmp_path / "data.npz"
    path.write_bytes(b"PK\x03\x04 not a zip archive")
    message = refused(tiny_cfg("dataset=npz", f"dataset.path={path}"), DataError)
    assert message.startswith("dataset.path:") and "is not a readable .npz file" in message


def test_a_good_data_file_still_passes(tmp_path, tiny_cfg):
    path = tmp_path / "data.npz"
    np.savez(path, **_good_arrays())
    data, _ = preflight(tiny_cfg("dataset=npz", f"dataset.path={path}"))
    assert data.num_classes == 3 and data.input_shape == (4,)


def _free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_ray_cluster_is_refused_before_ray_starts(tiny_cfg):
    """Ray would retry for a minute, then die with a traceback."""
    address = f"127.0.0.1:{_free_port()}"
    message = refused(tiny_cfg("backend=ray", f"backend.address={address}"), ConfigError)
    assert message.startswith("backend.address ") and address in message, message


def test_wandb_online_without_a_key_is_refused_up_front(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    message = refused(tiny_cfg("logger=wandb", "logger.mode=online"), ConfigError)
    assert message.startswith("logger.mode=online needs a W&B API key"), message


def test_wandb_online_with_an_unreachable_server_is_refused_up_front(tiny_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_free_port()}")
    message = refused(tiny_cfg("logger=wandb", "logger.mode=online"), ConfigError)
    assert message.startswith("logger.mode=online cannot reach the W&B server"), message
