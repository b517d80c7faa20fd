"""A synthetic classification problem (scikit-learn's make_classification)."""

from __future__ import annotations

from fedsim.datasets.base import ArraySplits, as_splits, stratified_split


def load(
    num_samples: int = 5000,
    num_features: int = 20,
    num_informative: int = 10,
    num_classes: int = 10,
    class_sep: float = 1.0,
    test_fraction: float = 0.2,
    data_seed: int = 0,
) -> ArraySplits:
    """Gaussian clusters per class on a random hypercube; a stratified test split."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=num_samples,
        n_features=num_features,
        n_informative=num_informative,
        n_redundant=0,
        n_classes=num_classes,
        n_clusters_per_class=1,
        class_sep=class_sep,
        random_state=data_seed,
    )
    x_tr, y_tr, x_te, y_te = stratified_split(x, y, test_fraction, data_seed, source="synthetic")
    return as_splits(x_tr, y_tr, x_te, y_te, num_classes=num_classes, source="synthetic")
