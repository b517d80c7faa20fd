"""Population scale (workload W2): `partition=resample` draws clients lazily, so a run's
cost follows the clients that take part, not the registered population."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedsim.datasets.federated import build_federated_data
from fedsim.datasets.partition import class_indices, matched_test_indices
from fedsim.datasets.resample import ResampledParts, ResamplePartitioner, resample_positions
from fedsim.errors import ConfigError
from fedsim.experiment import run_experiment
from fedsim.runtime import preflight

FEDSIM = [sys.executable, "-c", "from fedsim.cli import main; main()"]


def test_draws_depend_only_on_seed_and_client():
    first = resample_positions(seed=3, client=7, pool_size=50, size=40)
    resample_positions(seed=3, client=8, pool_size=50, size=40)  # other draws in between
    assert np.array_equal(first, resample_positions(seed=3, client=7, pool_size=50, size=40))
    assert not np.array_equal(first, resample_positions(seed=4, client=7, pool_size=50, size=40))
    assert not np.array_equal(first, resample_positions(seed=3, client=6, pool_size=50, size=40))
    assert first.shape == (40,) and first.min() >= 0 and first.max() < 50


def test_draws_are_with_replacement_from_the_whole_pool():
    drawn = resample_positions(seed=0, client=0, pool_size=10, size=1000)
    assert len(np.unique(drawn)) == 10  # every sample reachable, so repeats are certain


def test_parts_have_the_size_asked_for_and_draw_only_clients_asked_for():
    pool = np.arange(100, 130)  # train-split indices the clients draw from
    parts = ResampledParts(pool, num_clients=1_000_000, part_size=40, seed=1)
    assert len(parts) == 1_000_000 and parts.drawn == {}
    part = parts[123_456]
    assert part.shape == (40,) and set(part.tolist()) <= set(pool.tolist())
    assert np.array_equal(parts[-1], parts[999_999])
    assert sorted(parts.drawn) == [123_456, 999_999]
    assert np.array_equal(part, pool[resample_positions(1, 123_456, len(pool), 40)])
    with pytest.raises(IndexError):
        parts[1_000_000]


def test_the_partitioner_loads_the_same_rows_fedsim_trains_on(tiny_cfg):
    data = build_federated_data(tiny_cfg("partition=resample", "num_clients=50"))
    assert isinstance(data.train_parts, ResampledParts)
    rows = data.partitioner.load_partition(3)["_index"]  # positions in the label dataset
    assert np.array_equal(np.asarray(rows), data.train_parts[3])  # no long tail: identity


def test_num_clients_may_exceed_the_training_samples(tiny_cfg):
    cfg = tiny_cfg("partition=resample", "num_clients=200000", "clients_per_round=5",
                   "partition.samples_per_client=8", "evaluation.clients_per_round=3")
    data, _ = preflight(cfg)
    assert data.num_clients == 200_000 > len(data.splits.y_train)
    assert data.largest_client == 8
    assert len(data.train_parts.drawn) <= 3  # the checks drew no population in full
    summary = run_experiment(cfg)
    assert summary is not None
    # 2 rounds x 5 trained and 2 x 3 evaluated, and the plot's first 50 at most
    assert len(data.train_parts.drawn) <= 2 * 5 + 2 * 3 + 50
    assert data.client(199_999).num_train == 8


def test_other_partitioners_still_refuse_more_clients_than_samples(tiny_cfg):
    with pytest.raises(ConfigError, match="num_clients=5000 is more than the 4000"):
        preflight(tiny_cfg("partition=iid", "num_clients=5000"))


@pytest.mark.parametrize("value", [0, -3])
def test_bad_samples_per_client_is_named(tiny_cfg, value):
    cfg = tiny_cfg("partition=resample", f"partition.samples_per_client={value}")
    with pytest.raises(ConfigError) as caught:
        preflight(cfg)
    assert str(caught.value) == (f"partition.samples_per_client must be an integer >= 1 "
                                 f"(got {value})")
    assert not Path(cfg.output_dir).exists()


def test_the_partitioner_checks_its_arguments():
    with pytest.raises(ConfigError, match="partition.samples_per_client"):
        ResamplePartitioner(10, samples_per_client=2.5)
    with pytest.raises(ConfigError, match="num_clients"):
        ResamplePartitioner(0)


def test_cli_exits_2_on_bad_samples_per_client(tmp_path):
    out = subprocess.run(
        [*FEDSIM, "logger=none", "progress=false", "model=mlp", "num_clients=4",
         "clients_per_round=2", "num_rounds=1", "evaluation.clients_per_round=0",
         "partition=resample", "partition.samples_per_client=0"],
        cwd=tmp_path, env={**os.environ, "HYDRA_FULL_ERROR": "0"}, capture_output=True,
        text=True, timeout=300)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("fedsim: error")]
    assert errors == ["fedsim: error: partition.samples_per_client must be an integer >= 1 "
                      "(got 0)"]


def test_a_resampled_run_is_reproducible(tiny_cfg):
    def final(cfg) -> dict:
        run_experiment(cfg)
        return json.loads((Path(cfg.output_dir) / "metrics.jsonl").read_text()
                          .splitlines()[-1])

    overrides = ("partition=resample", "num_clients=10000", "evaluation.clients_per_round=0")
    first, second = final(tiny_cfg(*overrides)), final(tiny_cfg(*overrides))
    assert first["server/accuracy"] == second["server/accuracy"]


def test_class_pools_found_once_draw_the_same_test_sets():
    rng_labels = np.random.default_rng(0)
    test_labels = rng_labels.integers(0, 5, 300)
    train_labels = rng_labels.integers(0, 5, 40)
    pools = class_indices(test_labels, 5)
    plain = matched_test_indices(train_labels, test_labels, 5, 30, np.random.default_rng(1))
    pooled = matched_test_indices(train_labels, test_labels, 5, 30, np.random.default_rng(1),
                                  pools)
    assert np.array_equal(plain, pooled)
