"""A dataset split into clients, built once per process from the run config."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from fedsim.datasets.base import ArraySplits
from fedsim.datasets.partition import (
    class_groups,
    class_indices,
    label_counts,
    label_dataset,
    long_tail_indices,
    matched_test_indices,
    partition_indices,
)
from fedsim.errors import ConfigError, FedsimError

_CACHE: dict[str, FederatedData] = {}
_CACHE_SIZE = 2  # a sweep in one process keeps only the latest datasets in memory


@dataclass
class ClientData:
    """What one client holds: its training set and a test set following its label mix."""

    partition_id: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    class_groups: np.ndarray | None = None  # head/middle/tail index per class (long tail only)

    @property
    def num_train(self) -> int:
        return len(self.y_train)


@dataclass
class FederatedData:
    """Centralized arrays plus each client's training indices.

    Client test sets are drawn lazily from the test pool with a per-client seed,
    so the cost of a run depends on the clients that take part, not on how many
    are registered. `train_parts` is a list, or a lazy sequence
    (`fedsim.datasets.resample.ResampledParts`) that draws a client's indices when
    it is first asked for.
    """

    splits: ArraySplits
    train_parts: Sequence[np.ndarray]
    client_test_ratio: float
    seed: int
    partitioner: Any = field(default=None, repr=False)
    long_tailed: bool = False
    _test_indices: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def num_clients(self) -> int:
        return len(self.train_parts)

    @property
    def num_classes(self) -> int:
        return self.splits.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.splits.input_shape

    @cached_property
    def largest_client(self) -> int:
        """The most training samples any client holds (read without drawing every client
        when all clients hold the same known number)."""
        return largest_part(self.train_parts)

    @cached_property
    def class_groups(self) -> np.ndarray | None:
        """Head/middle/tail index per class from the federation's training counts.

        Only for long-tailed data (`data.imbalance_factor` < 1); None otherwise, and
        evaluations then report no group metrics.
        """
        if not self.long_tailed:
            return None
        return class_groups(self.label_counts().sum(axis=0))

    @cached_property
    def _test_class_pools(self) -> list[np.ndarray]:
        """Each class's test-pool indices, found once for all clients' test sets."""
        return class_indices(self.splits.y_test, self.num_classes)

    def client_test_indices(self, partition_id: int) -> np.ndarray:
        """Test-pool indices for this client (drawn on first use with a per-client seed)."""
        if partition_id not in self._test_indices:
            train_labels = self.splits.y_train[self.train_parts[partition_id]]
            size = max(1, round(self.client_test_ratio * len(train_labels)))
            rng = np.random.default_rng([self.seed, partition_id, 0x7E57])
            self._test_indices[partition_id] = matched_test_indices(
                train_labels, self.splits.y_test, self.num_classes, size, rng,
                self._test_class_pools,
            )
        return self._test_indices[partition_id]

    def client(self, partition_id: int) -> ClientData:
        if not 0 <= partition_id < self.num_clients:
            raise ValueError(
                f"partition-id {partition_id} outside [0, {self.num_clients - 1}]"
            )
        train = self.train_parts[partition_id]
        test = (
            self.client_test_indices(partition_id)
            if self.client_test_ratio > 0
            else np.zeros(0, dtype=np.int64)
        )
        s = self.splits
        return ClientData(
            partition_id=partition_id,
            x_train=torch.from_numpy(s.x_train[train]),
            y_train=torch.from_numpy(s.y_train[train]),
            x_test=torch.from_numpy(s.x_test[test]),
            y_test=torch.from_numpy(s.y_test[test]),
            num_classes=s.num_classes,
            class_groups=self.class_groups,
        )

    def server_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.splits.x_test), torch.from_numpy(self.splits.y_test)

    def label_counts(self) -> np.ndarray:
        return label_counts(self.splits.y_train, self.train_parts, self.num_classes)


def largest_part(parts: Sequence[np.ndarray]) -> int:
    """The largest part's size: the common size of parts that declare one (`part_size`:
    a resampled population, whose parts are drawn on use), else the maximum."""
    common = getattr(parts, "part_size", None)
    return int(common) if common is not None else max(len(p) for p in parts)


def data_key(cfg: DictConfig) -> str:
    """The part of the run config that determines the federated data."""
    return json.dumps(
        OmegaConf.to_container(
            OmegaConf.masked_copy(
                cfg, ["dataset", "partition", "num_clients", "seed", "data"]
            ),
            resolve=True,
        ),
        sort_keys=True,
    )


def _remember(key: str, data: FederatedData) -> FederatedData:
    _CACHE.pop(key, None)
    _CACHE[key] = data
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    return data


def prime_cache(cfg: DictConfig, data: FederatedData) -> None:
    """Hand a process data built elsewhere (Ray workers get it from the object store)."""
    _remember(data_key(cfg), data)


def build_federated_data(cfg: DictConfig) -> FederatedData:
    """Load the dataset, apply the long-tail step, partition it; cached per config."""
    key = data_key(cfg)
    cached = _CACHE.get(key)
    return cached if cached is not None else _remember(key, _build(cfg))


def instantiate_input(node: DictConfig, **kwargs: Any) -> Any:
    """`instantiate`, but a fedsim error raised inside comes out as itself (one clear line)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, FedsimError):
            raise err.__cause__ from None
        raise ConfigError(instantiation_failure(node, err.__cause__ or err)) from None


def instantiation_failure(node: Any, cause: BaseException) -> str:
    """One line for a group whose `_target_` refused its settings: the group (its key in the
    config), the target, and the first line of the target's own error."""
    group = node._key() if OmegaConf.is_dict(node) and node._key() else "config"
    target = node.get("_target_", "?") if OmegaConf.is_dict(node) else "?"
    text = str(cause).strip()
    reason = text.splitlines()[0] if text else type(cause).__name__
    return f"{group} ({target}) refuses its settings: {reason}"


def check_partition_fits(
    partition: DictConfig, num_samples: int, num_classes: int, num_clients: int, has_ids: bool
) -> None:
    """The partitioner's settings against the data it splits, before it runs.

    flwr-datasets would fail on these with its own words, or divide by zero
    (shards); this names the setting and what it can be.
    """
    target = str(partition._target_)
    if target.endswith("NaturalIdPartitioner") and not has_ids:
        raise ConfigError(
            "partition=natural needs a natural id per training sample (dataset=femnist, or an "
            "npz file with an 'ids' array); this dataset has none"
        )
    per_client = partition.get("num_classes_per_partition")
    if per_client is not None and per_client > num_classes:
        raise ConfigError(
            f"partition.num_classes_per_partition must be at most the dataset's {num_classes} "
            f"classes (got {per_client})"
        )
    shards, shard_size = partition.get("num_shards_per_partition"), partition.get("shard_size")
    if shards is not None or shard_size is not None:
        needed = num_clients * (shards or 1) * (shard_size or 1)
        field = "shard_size" if shard_size is not None else "num_shards_per_partition"
        if needed > num_samples:
            raise ConfigError(
                f"partition.{field} is too large: num_clients={num_clients} x "
                f"num_shards_per_partition={shards} x shard_size={shard_size} needs {needed} "
                f"training samples, and there are {num_samples}"
            )
    min_size = partition.get("min_partition_size") or 0
    if min_size * num_clients > num_samples:
        raise ConfigError(
            f"partition.min_partition_size must be at most {num_samples // num_clients} "
            f"({num_samples} training samples over num_clients={num_clients}) (got {min_size})"
        )


def check_long_tail_keeps_every_class(class_counts: np.ndarray, imbalance_factor: float) -> None:
    """The rarest class keeps n_max * IF >= 1 sample: a smaller factor would delete classes
    (the partitioner then fails on the gap, far from the setting that caused it)."""
    largest = int(class_counts.max(initial=0))
    if largest and imbalance_factor < 1 and np.floor(largest * imbalance_factor + 1e-9) < 1:
        raise ConfigError(
            f"data.imbalance_factor must be at least 1/{largest} = {1 / largest:.3g} for this "
            f"data (its largest class has {largest} training samples, so a smaller factor keeps "
            f"no sample of the rarest class) (got {imbalance_factor!r})")


def check_client_test_ratio(ratio: float, largest_client: int, test_pool: int) -> None:
    """A client's test set is ratio x its training samples, drawn from the test pool with
    the client's label mix (with replacement once the pool runs out). Up to 1 any ratio
    works; above 1 the test set must still fit in the pool: a larger ratio only repeats
    samples, and 1e6 would build millions of them per client."""
    limit = max(1.0, test_pool / largest_client)
    if ratio > limit:
        raise ConfigError(
            f"data.client_test_ratio must be at most {limit:.3g} for this data (up to 1, or "
            f"as many test samples as the pool's {test_pool} for the largest client's "
            f"{largest_client} training samples) (got {ratio!r})")


def _build(cfg: DictConfig) -> FederatedData:
    splits: ArraySplits = instantiate_input(cfg.dataset)
    labels, ids = splits.y_train, splits.train_ids
    check_long_tail_keeps_every_class(np.bincount(labels, minlength=splits.num_classes),
                                      cfg.data.imbalance_factor)
    if cfg.data.imbalance_factor < 1.0:
        keep = long_tail_indices(labels, splits.num_classes, cfg.data.imbalance_factor, cfg.seed)
    else:
        keep = np.arange(len(labels))
    target = get_object(cfg.partition._target_)
    # a partitioner that draws with replacement declares it, and gives its parts itself
    resampled = bool(getattr(target, "draws_with_replacement", False))
    if len(keep) < cfg.num_clients and not resampled:
        raise ConfigError(
            f"num_clients={cfg.num_clients} is more than the {len(keep)} training samples "
            "available; lower num_clients (or use partition=resample)"
        )
    check_partition_fits(cfg.partition, len(keep), splits.num_classes, cfg.num_clients,
                         has_ids=ids is not None)
    partitioner = instantiate_input(cfg.partition)
    partitioner.dataset = label_dataset(
        labels[keep], splits.num_classes, None if ids is None else ids[keep]
    )
    parts = (partitioner.parts(keep) if resampled else
             [keep[p] for p in partition_indices(partitioner, cfg.num_clients)])
    check_client_test_ratio(cfg.data.client_test_ratio, largest_part(parts),
                            len(splits.y_test))
    return FederatedData(
        splits=splits,
        train_parts=parts,
        client_test_ratio=float(cfg.data.client_test_ratio),
        seed=int(cfg.seed),
        partitioner=partitioner,
        long_tailed=cfg.data.imbalance_factor < 1.0,
    )
