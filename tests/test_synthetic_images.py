"""Workload W3's inputs: CIFAR-shaped synthetic images and pfl-research's benchmark CNN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.datasets.synthetic import load_images
from fedsim.errors import ConfigError
from fedsim.models import PflCNN
from fedsim.runtime import preflight


def test_images_are_cifar_shaped_balanced_and_seeded():
    splits = load_images(num_samples=600, test_fraction=1 / 6, data_seed=3)
    assert splits.x_train.shape == (500, 3, 32, 32) and splits.x_test.shape == (100, 3, 32, 32)
    assert splits.x_train.dtype == np.float32 and splits.num_classes == 10
    assert np.bincount(splits.y_train).tolist() == [50] * 10
    again = load_images(num_samples=600, test_fraction=1 / 6, data_seed=3)
    assert np.array_equal(splits.x_train, again.x_train)
    assert not np.array_equal(splits.x_train, load_images(num_samples=600, data_seed=4).x_train)


def test_classes_differ_by_their_pattern():
    """The class means are far apart in units of the noise: the data is learnable."""
    splits = load_images(num_samples=2000, class_sep=0.15)
    means = np.stack([splits.x_train[splits.y_train == c].mean(0).ravel() for c in range(10)])
    assert np.linalg.norm(means[0] - means[1]) > 5


@pytest.mark.parametrize(("settings", "field"), [
    ({"num_samples": 10**7}, "dataset.num_samples"),
    ({"image_shape": (3, 32)}, "dataset.image_shape"),
    ({"pattern_size": 64}, "dataset.pattern_size"),
])
def test_bad_image_settings_are_named(settings, field):
    with pytest.raises(ConfigError, match=f"^{field} must be"):
        load_images(**settings)


def test_pfl_cnn_has_pfl_researchs_parameter_count():
    model = PflCNN([3, 32, 32], 10)
    assert sum(p.numel() for p in model.parameters()) == 1_626_442
    assert model(torch.zeros(4, 3, 32, 32)).shape == (4, 10)


def test_pfl_cnn_refuses_a_bad_dropout():
    with pytest.raises(ConfigError, match="^model.dropout must be"):
        PflCNN([3, 32, 32], 10, dropout=(0.25, 1.5))


def test_the_w3_configs_pass_preflight(tiny_cfg):
    preflight(tiny_cfg("dataset=synthetic_images", "dataset.num_samples=240", "model=pfl_cnn",
                       "partition=iid", "num_clients=4", "clients_per_round=2"))
