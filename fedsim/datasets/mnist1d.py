"""MNIST-1D, generated locally from its templates (never downloaded), cached on disk."""

from __future__ import annotations

import os
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path

import numpy as np

from fedsim.datasets.base import ArraySplits, as_splits

KEYS = ("x", "y", "x_test", "y_test")


def cache_dir() -> Path:
    """`$FEDSIM_CACHE`, else `$XDG_CACHE_HOME/fedsim`, else `~/.cache/fedsim`."""
    if os.environ.get("FEDSIM_CACHE"):
        return Path(os.environ["FEDSIM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedsim"


def load(data_seed: int = 42, num_samples: int = 5000, train_split: float = 0.8) -> ArraySplits:
    """Generate the standard MNIST-1D split (4000 train / 1000 test, 40-dim, 10 classes).

    `mnist1d.make_dataset` builds the signals from templates in memory; its
    `get_dataset` would download a pickle, which is why it is not used. The
    result is kept in the cache directory, keyed by the arguments and the mnist1d
    version, so each later process (a deployed ClientApp runs one per message)
    reads it instead of generating it again (~1.3 s).
    """
    name = f"mnist1d-{version('mnist1d')}-seed{data_seed}-n{num_samples}-split{train_split}.npz"
    data = _read(cache_dir() / name, num_samples)
    if data is None:
        data = _generate(data_seed, num_samples, train_split)
        _write(cache_dir() / name, data)
    return as_splits(
        data["x"], data["y"], data["x_test"], data["y_test"], num_classes=10, source="mnist1d"
    )


def _generate(data_seed: int, num_samples: int, train_split: float) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = data_seed
    args.num_samples = num_samples
    args.train_split = train_split
    data = make_dataset(args)
    return {key: np.asarray(data[key]) for key in KEYS}


def _read(file: Path, num_samples: int) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is missing, damaged or of another size."""
    try:
        with np.load(file, allow_pickle=False) as cached:
            data = {key: cached[key] for key in KEYS}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    sizes_agree = len(data["x"]) == len(data["y"]) and len(data["x_test"]) == len(data["y_test"])
    if not sizes_agree or len(data["y"]) + len(data["y_test"]) != num_samples:
        return None
    return data


def _write(file: Path, data: dict[str, np.ndarray]) -> None:
    """Write atomically (concurrent processes may race); a read-only cache is skipped."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=file.parent, suffix=".npz", delete=False) as tmp:
            np.savez(tmp, **data)
    except OSError:
        return
    try:
        os.replace(tmp.name, file)
    except OSError:
        Path(tmp.name).unlink(missing_ok=True)
