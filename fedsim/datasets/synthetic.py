"""Synthetic classification problems: scikit-learn's make_classification (`load`), and
CIFAR-shaped images with a learnable pattern per class (`load_images`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedsim.datasets.base import ArraySplits, as_splits, stratified_split
from fedsim.errors import is_int, require


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


#: most float32 values `load_images` generates (1 GiB): CIFAR-10's 60,000 images fit
MAX_IMAGE_VALUES = 2**28


def load_images(
    num_samples: int = 12000,
    image_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    class_sep: float = 0.15,
    pattern_size: int = 8,
    test_fraction: float = 1 / 6,
    data_seed: int = 0,
) -> ArraySplits:
    """CIFAR-shaped images without a download: each class has a smooth random pattern (a
    `pattern_size` x `pattern_size` grid per channel, scaled up to the image), and a sample
    is its class's pattern times `class_sep` plus unit Gaussian noise. Balanced classes;
    the last `test_fraction` of the samples form the test split."""
    shape = tuple(image_shape)
    require(len(shape) == 3 and all(is_int(s) and 1 <= s <= 4096 for s in shape),
            "dataset.image_shape", "[channels, height, width], integers in [1, 4096]",
            list(shape))
    require(is_int(num_samples) and 2 <= num_samples * math.prod(shape) <= MAX_IMAGE_VALUES,
            "dataset.num_samples", f"an integer >= 2 with num_samples x {math.prod(shape)} "
            f"values per image at most {MAX_IMAGE_VALUES}", num_samples)
    require(is_int(pattern_size) and 1 <= pattern_size <= min(shape[1:]),
            "dataset.pattern_size", f"an integer in [1, {min(shape[1:])}]", pattern_size)
    rng = np.random.default_rng(data_seed)
    patterns = class_sep * class_patterns(rng, num_classes, shape, pattern_size)
    n_test = int(np.ceil(test_fraction * num_samples))
    require(0 < n_test < num_samples, "dataset.test_fraction",
            f"a share that leaves both splits samples of the {num_samples}", test_fraction)
    y_train = balanced_labels(rng, num_samples - n_test, num_classes)
    y_test = balanced_labels(rng, n_test, num_classes)
    x_train, x_test = noisy_images(rng, patterns, y_train), noisy_images(rng, patterns, y_test)
    return as_splits(x_train, y_train, x_test, y_test, num_classes=num_classes,
                     source="synthetic_images")


def class_patterns(rng: np.random.Generator, num_classes: int, shape: tuple[int, ...],
                   pattern_size: int) -> np.ndarray:
    """One smooth image per class: a coarse Gaussian grid repeated up to `shape` (C, H, W)."""
    channels, height, width = shape
    coarse = rng.standard_normal((num_classes, channels, pattern_size, pattern_size),
                                 dtype=np.float32)
    up_h, up_w = -(-height // pattern_size), -(-width // pattern_size)
    return coarse.repeat(up_h, axis=2).repeat(up_w, axis=3)[:, :, :height, :width]


def balanced_labels(rng: np.random.Generator, count: int, num_classes: int) -> np.ndarray:
    """`count` labels, each class as often as the others (within one), shuffled."""
    return rng.permutation(np.arange(count) % num_classes)


def noisy_images(rng: np.random.Generator, patterns: np.ndarray, labels: np.ndarray,
                 chunk: int = 4096) -> np.ndarray:
    """Unit Gaussian noise plus each label's pattern, built in place chunk by chunk (no
    second full-size array)."""
    x = rng.standard_normal((len(labels), *patterns.shape[1:]), dtype=np.float32)
    for start in range(0, len(labels), chunk):
        x[start:start + chunk] += patterns[labels[start:start + chunk]]
    return x
