"""The in-memory form every data source returns, and its validation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsim.errors import DataError


@dataclass(frozen=True)
class ArraySplits:
    """A centralized dataset: float32 features and int64 labels, train and test.

    `train_ids` optionally holds a natural client id per training sample (e.g. the
    writer of a FEMNIST character) for natural partitioning.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    train_ids: np.ndarray | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x_train.shape[1:])


def as_splits(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int | None = None,
    train_ids: np.ndarray | None = None,
    source: str = "data",
) -> ArraySplits:
    """Cast arrays to float32/int64, check them, and wrap them as `ArraySplits`."""
    y_train_arr = _as_labels(y_train, f"{source}: y_train")
    y_test_arr = _as_labels(y_test, f"{source}: y_test")
    if num_classes is None:
        num_classes = int(max(y_train_arr.max(initial=0), y_test_arr.max(initial=0))) + 1
    splits = ArraySplits(
        x_train=_as_features(x_train, f"{source}: x_train"),
        y_train=y_train_arr,
        x_test=_as_features(x_test, f"{source}: x_test"),
        y_test=y_test_arr,
        num_classes=int(num_classes),
        train_ids=None if train_ids is None else np.asarray(train_ids),
    )
    check_splits(splits, source)
    return splits


def check_features_and_labels(x: np.ndarray, y: np.ndarray, source: str) -> None:
    """`x`: one sample per row; `y`: one class id per sample. Checked before arrays are
    split, so that a bad label is reported as itself and not as a failed split."""
    _as_features(x, f"{source}: x")
    labels = _as_labels(y, f"{source}: y")
    if len(x) != len(labels):
        raise DataError(f"{source}: x has {len(x)} samples but y has {len(labels)}")


def _as_features(x: np.ndarray, name: str) -> np.ndarray:
    """float32 samples, one per row: numeric, at least 2-D (samples, features...)."""
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise DataError(f"{name} must hold numbers, got dtype {x.dtype}")
    if x.ndim < 2:
        raise DataError(
            f"{name} must have one row per sample, shape (samples, features...), got shape "
            f"{x.shape}"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def _as_labels(y: np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{name} must be a 1-D array of class ids, got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)):
            raise DataError(f"{name} contains NaN or Inf labels")
        if not np.all(y == np.round(y)):
            raise DataError(f"{name} contains non-integer labels")
    elif y.dtype.kind not in "iub":
        raise DataError(f"{name} must hold integer class ids, got dtype {y.dtype}")
    return y.astype(np.int64)


def check_splits(splits: ArraySplits, source: str = "data") -> None:
    """Raise `DataError` naming the array when shapes, values or labels are inconsistent."""
    for part in ("train", "test"):
        x, y = getattr(splits, f"x_{part}"), getattr(splits, f"y_{part}")
        if len(x) != len(y):
            raise DataError(
                f"{source}: x_{part} has {len(x)} samples but y_{part} has {len(y)}"
            )
        if len(x) == 0:
            raise DataError(f"{source}: the {part} split is empty")
        if not np.all(np.isfinite(x)):
            raise DataError(f"{source}: x_{part} contains NaN or Inf values")
        if y.min() < 0 or y.max() >= splits.num_classes:
            raise DataError(
                f"{source}: y_{part} labels must lie in [0, {splits.num_classes - 1}], "
                f"got [{y.min()}, {y.max()}]"
            )
    problem = class_count_problem(splits.num_classes, len(splits.y_train) + len(splits.y_test))
    if problem:
        raise DataError(f"{source}: {problem}")
    if splits.x_train.shape[1:] != splits.x_test.shape[1:]:
        raise DataError(
            f"{source}: x_train samples have shape {splits.x_train.shape[1:]} but x_test "
            f"samples have shape {splits.x_test.shape[1:]}"
        )
    if splits.train_ids is not None and len(splits.train_ids) != len(splits.y_train):
        raise DataError(f"{source}: train_ids must have one id per training sample")


def class_count_problem(num_classes: int, num_samples: int) -> str | None:
    """Why `num_classes` cannot be the class count of `num_samples` samples, or None.

    More classes than samples leaves classes without a single example, and a stray label
    (say 1,000,000 in a 10-class file) would otherwise build a model head that large.
    """
    if num_classes <= num_samples:
        return None
    return (f"{num_classes} classes (labels 0..{num_classes - 1}) is more classes than the "
            f"{num_samples} samples; labels must be class indices 0..K-1 with K at most the "
            "number of samples (check for a stray label, or set dataset.num_classes)")


def stratified_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, source: str = "data"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split arrays into train/test keeping the class proportions (sklearn).

    A class with a single sample, or a side smaller than the number of classes,
    cannot be stratified; then the split is a plain seeded shuffle (small per-node
    files hit this). A split that would leave a side empty raises a `DataError`.
    """
    from sklearn.model_selection import train_test_split

    n_test = int(np.ceil(test_fraction * len(y)))  # as sklearn rounds a fractional test size
    if not 0 < n_test < len(y):
        raise DataError(
            f"{source}: test_fraction={test_fraction} of {len(y)} samples leaves the train or "
            "the test split empty; use more samples or another test_fraction"
        )
    _, counts = np.unique(y, return_counts=True)
    stratifiable = counts.min() > 1 and min(n_test, len(y) - n_test) >= len(counts)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y if stratifiable else None
    )
    return x_tr, y_tr, x_te, y_te
