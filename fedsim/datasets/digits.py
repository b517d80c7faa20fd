"""scikit-learn's 8x8 handwritten digits (ships with scikit-learn, offline)."""

from __future__ import annotations

from fedsim.datasets.base import ArraySplits, as_splits, stratified_split


def load(test_fraction: float = 0.2, split_seed: int = 0) -> ArraySplits:
    """1797 images as (1, 8, 8) arrays scaled to [0, 1]; a stratified train/test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).reshape(-1, 1, 8, 8)
    x_tr, y_tr, x_te, y_te = stratified_split(
        x, digits.target, test_fraction, split_seed, source="digits"
    )
    return as_splits(x_tr, y_tr, x_te, y_te, num_classes=10, source="digits")
