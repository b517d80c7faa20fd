import numpy as np
import pytest

from fedsim.datasets import digits, hf, mnist1d, npz, synthetic
from fedsim.datasets.federated import build_federated_data
from fedsim.errors import ConfigError, DataError


def test_mnist1d_is_generated_with_the_standard_split():
    splits = mnist1d.load()
    assert splits.x_train.shape == (4000, 40) and splits.x_test.shape == (1000, 40)
    assert splits.num_classes == 10 and splits.x_train.dtype == np.float32


def test_digits_and_synthetic_load_offline():
    d = digits.load()
    assert d.input_shape == (1, 8, 8) and len(d.y_train) + len(d.y_test) == 1797
    s = synthetic.load(num_samples=500, num_features=8, num_informative=4, num_classes=3)
    assert s.input_shape == (8,) and s.num_classes == 3


def test_npz_with_x_y_is_split(tmp_path):
    path = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.normal(size=(100, 5)), y=np.repeat([0, 1], 50))
    splits = npz.load(str(path), test_fraction=0.2)
    assert len(splits.y_train) == 80 and len(splits.y_test) == 20


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 2))}, "expected arrays"),
        ({"x_train": np.zeros((4, 2)), "y_train": np.zeros(3), "x_test": np.zeros((2, 2)),
          "y_test": np.zeros(2)}, "x_train has 4 samples but y_train has 3"),
        ({"x_train": np.zeros((2, 2)), "y_train": np.array([0.0, np.nan]),
          "x_test": np.zeros((2, 2)), "y_test": np.zeros(2)}, "NaN or Inf labels"),
        ({"x_train": np.zeros((2, 2)), "y_train": np.zeros(2), "x_test": np.zeros((2, 3)),
          "y_test": np.zeros(2)}, "shape"),
    ],
)
def test_bad_npz_files_are_rejected_with_the_reason(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        npz.load(str(path))


def test_missing_npz_file_names_the_field(tmp_path):
    with pytest.raises(DataError, match="dataset.path"):
        npz.load(str(tmp_path / "nope.npz"))


def test_hub_dataset_without_network_fails_fast_and_names_offline_datasets(monkeypatch):
    monkeypatch.setattr(hf, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataError, match="dataset=mnist1d"):
        hf.load("uoft-cs/cifar10", "img", "label")


def test_client_test_split_follows_the_client_mix(tiny_cfg):
    cfg = tiny_cfg("partition=pathological", "partition.num_classes_per_partition=2",
                   "data.client_test_ratio=1.0")
    data = build_federated_data(cfg)
    for pid in range(cfg.num_clients):
        client = data.client(pid)
        assert set(client.y_test.tolist()) <= set(client.y_train.tolist())
        assert len(client.y_test) == client.num_train


def test_long_tail_step_composes_with_dirichlet(tiny_cfg):
    cfg = tiny_cfg("partition=dirichlet", "data.imbalance_factor=0.1")
    counts = build_federated_data(cfg).label_counts().sum(0)
    assert counts[0] > 5 * counts[-1]


def test_more_clients_than_samples_is_a_config_error(tiny_cfg):
    cfg = tiny_cfg("dataset=synthetic", "dataset.num_samples=50", "num_clients=45",
                   "clients_per_round=3")
    with pytest.raises(ConfigError, match="num_clients=45"):
        build_federated_data(cfg)


def test_natural_partition_from_npz_ids(tmp_path, tiny_cfg):
    rng = np.random.default_rng(0)
    ids = np.repeat(["w0", "w1", "w2"], [10, 20, 30])
    path = tmp_path / "writers.npz"
    np.savez(path, x_train=rng.normal(size=(60, 4)), y_train=rng.integers(0, 2, 60),
             x_test=rng.normal(size=(10, 4)), y_test=rng.integers(0, 2, 10), ids=ids)
    cfg = tiny_cfg("dataset=npz", f"dataset.path={path}", "partition=natural", "num_clients=3",
                   "clients_per_round=2")
    data = build_federated_data(cfg)
    assert sorted(len(p) for p in data.train_parts) == [10, 20, 30]
    for part in data.train_parts:
        assert len(set(ids[part])) == 1


def test_mnist1d_is_cached_on_disk_and_a_broken_cache_is_regenerated(tmp_path, monkeypatch):
    from fedsim.datasets import mnist1d

    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path))
    fresh = mnist1d.load(num_samples=200)
    (cached_file,) = tmp_path.glob("mnist1d-*-n200-*.npz")
    cached = mnist1d.load(num_samples=200)
    for part in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(fresh, part), getattr(cached, part))
    cached_file.write_bytes(b"not an npz")
    again = mnist1d.load(num_samples=200)
    assert np.array_equal(again.x_train, fresh.x_train)
    assert np.load(cached_file)["x"].shape == (160, 40)
