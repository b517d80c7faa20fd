"""Classification metrics, split by class group, and their aggregation over clients.

Under long-tailed data a single accuracy hides what happens to rare classes, so
every evaluation also reports head / middle / tail accuracy (the groups come
from `fedsim.datasets.partition.class_groups`). Client evaluations are combined
two ways: sample-weighted, as Flower does (`accuracy`), and as a plain mean over
clients (`mean-accuracy`), which is how personalized FL reports local accuracy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch
from flwr.app import MetricRecord, RecordDict
from torch import nn

#: The metric every reply carries, weighting it in aggregation (Flower's default key).
NUM_EXAMPLES = "num-examples"

#: Class groups by training frequency, in the order `class_groups` numbers them.
GROUPS = ("head", "middle", "tail")

#: The subset a metric is restricted to: a class group or one class (`-tail`, `-class-5`).
_SUBSET = re.compile(rf"-({'|'.join(GROUPS)}|class-\d+)$")


def classification_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_groups: np.ndarray | None = None,
    classes: Sequence[int] = (),
) -> dict[str, float | int]:
    """Loss, accuracy and sample count; per class group too when `class_groups` is given.

    `class_groups[c]` is the group index of class c (0 head, 1 middle, 2 tail).
    Each class in `classes` also gets `accuracy-class-<c>` (e.g. the slow devices'
    class under staleness).
    Every key is always present (an empty set or group reports 0 with count 0),
    because Flower requires all replies of a round to carry the same keys.
    """
    n = len(labels)
    metrics: dict[str, float | int] = {"loss": 0.0, "accuracy": 0.0, NUM_EXAMPLES: n}
    correct = torch.zeros(0, dtype=torch.bool)
    if n:
        metrics["loss"] = nn.functional.cross_entropy(logits, labels).item()
        correct = logits.argmax(1) == labels
        metrics["accuracy"] = correct.sum().item() / n
    if class_groups is not None:
        label_groups = torch.as_tensor(class_groups)[labels] if n else torch.zeros(0)
        for index, name in enumerate(GROUPS):
            metrics.update(_subset_accuracy(name, correct, label_groups == index))
    for label in classes:
        metrics.update(_subset_accuracy(f"class-{label}", correct, labels == label))
    return metrics


def _subset_accuracy(
    subset: str, correct: torch.Tensor, members: torch.Tensor
) -> dict[str, float | int]:
    """`accuracy-<subset>` over the samples in `members`, and their count (0 when empty)."""
    count = int(members.sum())
    hits = correct[members].sum().item()
    return {f"accuracy-{subset}": hits / count if count else 0.0,
            f"{NUM_EXAMPLES}-{subset}": count}


def mask_absent_classes(logits: torch.Tensor, train_labels: torch.Tensor) -> torch.Tensor:
    """Logits with -inf for every class absent from `train_labels` (a client's training set).

    A client knows which classes it holds; personalized evaluations use that, not
    the labels of its test split.
    """
    present = torch.bincount(train_labels, minlength=logits.shape[1]) > 0
    return logits.masked_fill(~present, float("-inf"))


def prefixed(metrics: dict[str, float | int], prefix: str) -> dict[str, float | int]:
    """`metrics` under `prefix` (`global-accuracy`, ...), their counts left out: they are
    the same samples as the unprefixed metrics', whose counts weight them."""
    return {f"{prefix}{key}": value for key, value in metrics.items()
            if not key.startswith(NUM_EXAMPLES)}


def count_key(key: str) -> str:
    """The count behind metric `key`: `num-examples-tail` for `accuracy-tail`,
    `num-examples-class-5` for `accuracy-class-5`, else the total."""
    match = _SUBSET.search(key)
    return f"{NUM_EXAMPLES}-{match.group(1)}" if match else NUM_EXAMPLES


def measured(metrics: dict[str, float | int]) -> dict[str, float | int]:
    """The metrics without their counts, and without the groups that had no samples."""
    return {key: value for key, value in metrics.items()
            if not key.startswith(NUM_EXAMPLES) and metrics.get(count_key(key), 1) > 0}


def aggregate_client_evaluations(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Combine client evaluation metrics (Flower's `evaluate_metrics_aggr_fn`).

    - every metric: mean weighted by its count (`num-examples`, or the group's own
      count for `*-head/-middle/-tail`), as Flower's FedAvg does, but a group only
      counts the samples of that group;
    - `mean-<key>` for every accuracy (`mean-accuracy`, `mean-accuracy-tail`, ...): the
      unweighted mean over the clients that have test samples (of that group),
      i.e. "local accuracy";
    - `std-<key>`, `worst10-<key>`, `best10-<key>` for every whole-split accuracy
      (`accuracy`, `global-accuracy`, ...): how evenly the clients fare
      (`client_spread`);
    - `clients`: how many clients reported.

    Counts themselves are not averaged. A key with no weight anywhere is left out.
    """
    metrics = [next(iter(record.metric_records.values())) for record in records]
    out = MetricRecord({"clients": len(metrics)})
    keys = [k for k in metrics[0] if not k.startswith(NUM_EXAMPLES) and k != weighting_key]
    for key in keys:
        weight_key = count_key(key)
        weight_key = weighting_key if weight_key == NUM_EXAMPLES else weight_key
        weights = [float(m.get(weight_key, 0)) for m in metrics]
        total = sum(weights)
        if total <= 0:
            continue
        out[key] = sum(float(m[key]) * w for m, w in zip(metrics, weights, strict=True)) / total
        if "accuracy" in key:
            present = [float(m[key]) for m, w in zip(metrics, weights, strict=True) if w > 0]
            out[f"mean-{key}"] = math.fsum(present) / len(present)
            if not _SUBSET.search(key):  # whole-split accuracies: how evenly clients fare
                for name, value in client_spread(present).items():
                    out[f"{name}-{key}"] = value
    return out


#: share of clients in the worst and best tails of `client_spread`
TAIL_SHARE = 0.1


def client_spread(values: Sequence[float]) -> dict[str, float]:
    """Fairness across clients: `std` (population std of the per-client values),
    `worst10` and `best10` (mean of the lowest and highest 10% of them, at least
    one client each)."""
    ordered = sorted(values)
    tail = max(1, round(TAIL_SHARE * len(ordered)))
    return {"std": float(np.std(ordered)),
            "worst10": math.fsum(ordered[:tail]) / tail,
            "best10": math.fsum(ordered[-tail:]) / tail}
