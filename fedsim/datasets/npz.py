"""Bring-your-own data: a local `.npz` file with x/y arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedsim.datasets.base import ArraySplits, as_splits, stratified_split
from fedsim.errors import DataError


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
        arrays = dict(np.load(file, allow_pickle=False))
    except (OSError, ValueError) as err:
        raise DataError(f"{field}: '{file}' is not a readable .npz file ({err})") from err
    ids = arrays.get("ids")
    if num_classes is None and "num_classes" in arrays:
        num_classes = int(arrays["num_classes"])
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        parts = (arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"])
    elif {"x", "y"} <= arrays.keys():
        x, y = arrays["x"], arrays["y"]
        if len(x) != len(y):
            raise DataError(f"{field} {file}: x has {len(x)} samples but y has {len(y)}")
        if ids is not None:
            raise DataError(
                f"{field} {file}: 'ids' needs explicit x_train/y_train/x_test/y_test arrays"
            )
        parts = stratified_split(x, y, test_fraction, split_seed)
        parts = (parts[0], parts[1], parts[2], parts[3])
    else:
        raise DataError(
            f"{field} {file}: expected arrays x_train, y_train, x_test, y_test (or x, y); "
            f"found {sorted(arrays)}"
        )
    return as_splits(*parts, num_classes=num_classes, train_ids=ids, source=f"{field} {file}")
