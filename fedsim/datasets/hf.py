"""Image datasets from the Hugging Face Hub, loaded through flwr-datasets.

These need a network on first use (afterwards the Hugging Face cache serves
them). Without one, loading fails with a `DataError` that names the offline
datasets instead.
"""

from __future__ import annotations

import numpy as np

from fedsim.datasets.base import ArraySplits, as_splits
from fedsim.errors import DataError

OFFLINE_HINT = "dataset=mnist1d, dataset=digits, dataset=synthetic or dataset=npz"


def load(
    repo: str,
    image_key: str,
    label_key: str,
    test_split: str | None = "test",
    natural_id_key: str | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> ArraySplits:
    """Download (or read from cache) `repo` and return images as float32 CHW in [0, 1].

    Datasets without a test split (FEMNIST) are split here, by a seeded random
    fraction of the training set.
    """
    train, test = _load_hf_splits(repo, test_split, test_fraction, split_seed)
    x_train, y_train = _to_arrays(train, image_key, label_key)
    x_test, y_test = _to_arrays(test, image_key, label_key)
    ids = np.asarray(train[natural_id_key]) if natural_id_key else None
    num_classes = train.features[label_key].num_classes if hasattr(
        train.features[label_key], "num_classes"
    ) else None
    return as_splits(x_train, y_train, x_test, y_test, num_classes, ids, source=repo)


def _load_hf_splits(repo: str, test_split: str | None, test_fraction: float, seed: int):
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    if not _hub_reachable():
        _use_cache_only()
    try:
        fds = FederatedDataset(dataset=repo, partitioners={"train": IidPartitioner(1)})
        train = fds.load_split("train")
        if test_split is None:
            both = train.train_test_split(test_size=test_fraction, seed=seed)
            return both["train"], both["test"]
        return train, fds.load_split(test_split)
    except Exception as err:  # the Hub client raises many types for "no network"
        raise DataError(
            f"dataset '{repo}' could not be loaded from the Hugging Face Hub "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}). "
            f"It needs a network on first use; offline, use {OFFLINE_HINT}."
        ) from err


def _to_arrays(split, image_key: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    numpy_split = split.with_format("numpy")
    images = np.asarray(numpy_split[image_key], dtype=np.float32) / 255.0
    if images.ndim == 3:  # grayscale HxW -> 1xHxW
        images = images[:, None, :, :]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):  # HWC -> CHW
        images = images.transpose(0, 3, 1, 2)
    return images, np.asarray(numpy_split[label_key])


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host resolves and accepts a connection (a quick check, no retries)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _use_cache_only() -> None:
    """Switch the Hub clients to offline mode so a cached copy loads without retries."""
    import datasets.config
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
