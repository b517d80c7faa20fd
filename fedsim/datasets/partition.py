"""Splitting a centralized dataset into clients.

The partitioners themselves are flwr-datasets' (IID, Dirichlet, pathological,
shard, size skew, natural id); this module only feeds them labels and reads
back indices, adds the long-tail step that can precede any of them, and draws
per-client test sets that follow each client's label mix.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedsim.errors import ConfigError

LABEL = "label"
NATURAL_ID = "natural_id"
INDEX = "_index"
#: flwr-datasets' Dirichlet partitioner warns once for every rejected draw
_REDRAW = re.compile(r"min_partition_size \((\d+)\) was not satisfied")

log = logging.getLogger("fedsim")


def long_tail_counts(class_counts: np.ndarray, imbalance_factor: float) -> np.ndarray:
    """Samples kept per class: n_c = int(n_max * IF^(c / (K - 1))), capped at what exists.

    Class 0 is the head; IF = n_min / n_max, so 0.01 is the literature's "IF = 100".
    """
    num_classes = len(class_counts)
    if num_classes < 2 or imbalance_factor == 1.0:
        return class_counts.copy()
    exponents = np.arange(num_classes) / (num_classes - 1)
    # floor with a little slack: a power that is a whole number must not lose 1 to a
    # last-bit rounding of the pow kernel (100 * 0.25**0.5 is 50, not 49)
    wanted = np.floor(class_counts.max() * imbalance_factor**exponents + 1e-9).astype(np.int64)
    return np.minimum(wanted, class_counts)


def long_tail_indices(
    labels: np.ndarray, num_classes: int, imbalance_factor: float, seed: int
) -> np.ndarray:
    """Sorted indices of a long-tailed subsample of `labels` (random within each class)."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels, minlength=num_classes)
    keep = long_tail_counts(counts, imbalance_factor)
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=int(keep[c]), replace=False)
        for c in range(num_classes)
    ]
    return np.sort(np.concatenate(chosen))


def class_groups(
    class_counts: np.ndarray, thresholds: tuple[float, float] = (0.75, 0.95)
) -> np.ndarray:
    """Group index per class by training frequency: 0 head, 1 middle, 2 tail.

    Classes are sorted by count (most frequent first, ties by class id); a class
    is head while the share of samples *before* it is below `thresholds[0]`
    (75%), middle while below `thresholds[1]` (95%), tail after that. So the class
    that crosses 75% is still head, as in FedLoGe's reference `shot_split`.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    order = np.argsort(-counts, kind="stable")
    share_before = (np.cumsum(counts[order]) - counts[order]) / counts.sum()
    groups = np.empty(len(counts), dtype=np.int64)
    groups[order] = np.searchsorted(np.asarray(thresholds), share_before, side="right")
    return groups


def label_dataset(labels: np.ndarray, num_classes: int, ids: np.ndarray | None = None):
    """A Hugging Face `Dataset` of labels (+ natural ids) for flwr-datasets partitioners."""
    from datasets import ClassLabel, Dataset, Features, Value

    columns = {LABEL: labels.tolist(), INDEX: np.arange(len(labels)).tolist()}
    features = {
        LABEL: ClassLabel(num_classes=num_classes, names=[str(c) for c in range(num_classes)]),
        INDEX: Value("int64"),
    }
    if ids is not None:
        columns[NATURAL_ID] = [str(i) for i in ids]
        features[NATURAL_ID] = Value("string")
    return Dataset.from_dict(columns, features=Features(features))


def partition_indices(partitioner, num_partitions: int) -> list[np.ndarray]:
    """Read each partition's sample indices from a flwr-datasets partitioner."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            available = partitioner.num_partitions
        except ValueError as err:  # e.g. Dirichlet could not satisfy min_partition_size
            raise ConfigError(partition_failure(partitioner, err)) from None
    _report_redraws(caught)
    if available != num_partitions:
        raise ConfigError(
            f"partition: the partitioner produced {available} partitions but "
            f"num_clients={num_partitions}"
        )
    # imported here, not at the top: flwr-datasets imports seaborn and scipy.stats (~2.5 s),
    # which a client process that only reads partitions (a Ray actor, a worker) never needs
    from flwr_datasets.partitioner import IidPartitioner

    if type(partitioner) is IidPartitioner:  # not a subclass: it may cut otherwise
        parts = contiguous_shards(partitioner.dataset.data.column(INDEX).to_numpy(),
                                  num_partitions)
    else:
        parts = [_partition_index(partitioner, pid) for pid in range(num_partitions)]
    empty = [pid for pid, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(
            f"partition: clients {empty[:10]} received no training samples; lower num_clients "
            "or raise partition.alpha / partition.min_partition_size"
        )
    return parts


def contiguous_shards(index: np.ndarray, num_shards: int) -> list[np.ndarray]:
    """`Dataset.shard(num_shards, i, contiguous=True)` for every i at once, as
    `IidPartitioner` cuts: the first `len % num_shards` shards get one extra sample. Reading
    them one by one builds a Hugging Face dataset per client: 7 ms each, so 100,000
    clients took 703 s; this takes well under a second."""
    return [np.asarray(part, dtype=np.int64) for part in np.array_split(index, num_shards)]


def _partition_index(partitioner: Any, partition_id: int) -> np.ndarray:
    try:
        part = partitioner.load_partition(partition_id)
    except ValueError as err:
        raise ConfigError(f"partition: {err}") from err
    return np.asarray(part[INDEX], dtype=np.int64)


def partition_failure(partitioner: Any, err: Exception) -> str:
    """flwr-datasets' reason in fedsim's words: a Dirichlet partitioner that gave up after its
    redraws names the settings that make a feasible split."""
    if "max number of attempts" not in str(err):
        return f"partition: {err}"
    floor = getattr(partitioner, "_min_partition_size", "?")
    return ("partition: no Dirichlet draw gave every client partition.min_partition_size="
            f"{floor} samples (flwr-datasets gave up after its redraws); raise partition.alpha, "
            "or lower partition.min_partition_size or num_clients")


def _report_redraws(caught: list[warnings.WarningMessage]) -> None:
    """One line for the Dirichlet partitioner's redraws, instead of a paragraph per draw;
    any other warning is passed on unchanged."""
    floors = []
    for warning in caught:
        match = _REDRAW.search(str(warning.message))
        if match:
            floors.append(int(match.group(1)))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                   warning.lineno)
    if floors:
        log.warning(
            "partition: %d Dirichlet draw(s) left a client under partition.min_partition_size="
            "%d samples and were redrawn; the split used is conditioned on that floor, so it "
            "is a little less skewed than alpha alone would give", len(floors), floors[0])


def largest_remainder(proportions: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to `total` that follow `proportions` as closely as possible."""
    raw = proportions / proportions.sum() * total
    counts = np.floor(raw).astype(np.int64)
    short = total - counts.sum()
    if short > 0:
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def matched_test_indices(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    size: int,
    rng: np.random.Generator,
    class_pools: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Indices into the test pool whose label mix follows the client's training mix.

    Each class is drawn without replacement while the pool lasts, with replacement
    beyond it, so the test set keeps the client's proportions even for large ratios.
    `class_pools` (`class_indices(test_labels, num_classes)`), when given, saves finding
    each class's test samples again for every client.
    """
    mix = np.bincount(train_labels, minlength=num_classes).astype(np.float64)
    wanted = largest_remainder(mix, size)
    chosen = []
    for c in np.flatnonzero(wanted):
        pool = np.flatnonzero(test_labels == c) if class_pools is None else class_pools[c]
        if len(pool) == 0:
            continue
        n = int(wanted[c])
        chosen.append(rng.choice(pool, size=n, replace=n > len(pool)))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def class_indices(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """The sorted indices of each class's samples, one array per class."""
    return [np.flatnonzero(labels == c) for c in range(num_classes)]


def label_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Clients x classes matrix of training-sample counts."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
