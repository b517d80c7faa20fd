"""Bring-your-own data: a local `.npz` file with x/y arrays."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from fedsim.datasets.base import (
    ArraySplits,
    as_splits,
    check_features_and_labels,
    stratified_split,
)
from fedsim.errors import DataError

SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load(
    path: str,
    num_classes: int | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    field: str = "dataset.path",
) -> ArraySplits:
    """Load `x_train, y_train, x_test, y_test` (or `x, y`, split here) from an .npz file.

    An optional `ids` array (one per training sample) enables natural partitioning; an
    optional scalar `num_classes` gives the class count when `num_classes` is None.
    `field` names the setting the path came from, in error messages.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{field}: no such file '{file}'")
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = dict(npz)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{field}: '{file}' is not a readable .npz file ({err})") from err
    source = f"{field} {file}"
    ids = arrays.get("ids")
    if num_classes is None and "num_classes" in arrays:
        num_classes = _stored_num_classes(arrays["num_classes"], source)
    if set(SPLIT_KEYS) <= arrays.keys():
        parts = tuple(arrays[key] for key in SPLIT_KEYS)
    elif {"x", "y"} <= arrays.keys():
        if ids is not None:
            raise DataError(f"{source}: 'ids' needs explicit x_train/y_train/x_test/y_test arrays")
        check_features_and_labels(arrays["x"], arrays["y"], source)
        parts = stratified_split(arrays["x"], arrays["y"], test_fraction, split_seed, source)
    else:
        raise DataError(
            f"{source}: expected arrays x_train, y_train, x_test, y_test (or x, y); "
            f"found {sorted(arrays)}"
        )
    return as_splits(*parts, num_classes=num_classes, train_ids=ids, source=source)


def _stored_num_classes(value: np.ndarray, source: str) -> int:
    """The file's `num_classes` entry: one whole number >= 1."""
    number = value.dtype.kind in "iuf" and value.ndim == 0
    if not (number and np.isfinite(value) and value == np.round(value) and value >= 1):
        raise DataError(
            f"{source}: num_classes must be a single integer >= 1 (got {value.tolist()!r})"
        )
    return int(value)
