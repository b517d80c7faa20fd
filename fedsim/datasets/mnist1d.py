"""MNIST-1D, generated locally from its templates (never downloaded)."""

from __future__ import annotations

from fedsim.datasets.base import ArraySplits, as_splits


def load(data_seed: int = 42, num_samples: int = 5000, train_split: float = 0.8) -> ArraySplits:
    """Generate the standard MNIST-1D split (4000 train / 1000 test, 40-dim, 10 classes).

    `mnist1d.make_dataset` builds the signals from templates in memory; its
    `get_dataset` would download a pickle, which is why it is not used.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = data_seed
    args.num_samples = num_samples
    args.train_split = train_split
    data = make_dataset(args)
    return as_splits(
        data["x"], data["y"], data["x_test"], data["y_test"], num_classes=10, source="mnist1d"
    )
