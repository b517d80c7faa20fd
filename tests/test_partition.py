import numpy as np
import pytest
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

from fedsim.datasets.partition import (
    label_dataset,
    largest_remainder,
    long_tail_counts,
    long_tail_indices,
    matched_test_indices,
    partition_indices,
)
from fedsim.errors import ConfigError


def test_long_tail_counts_follow_the_formula():
    # n_max = 100, IF = 0.01, K = 3: exponents 0, 0.5, 1 -> 100, 10, 1
    assert long_tail_counts(np.array([100, 100, 100]), 0.01).tolist() == [100, 10, 1]


def test_long_tail_counts_are_capped_by_what_exists():
    assert long_tail_counts(np.array([50, 100, 5]), 0.25).tolist() == [50, 50, 5]


def test_long_tail_factor_one_keeps_everything():
    counts = np.array([7, 3, 9])
    assert long_tail_counts(counts, 1.0).tolist() == [7, 3, 9]


def test_long_tail_indices_keep_the_counts_and_are_unique():
    labels = np.repeat(np.arange(4), 50)
    kept = long_tail_indices(labels, 4, 0.1, seed=0)
    assert len(np.unique(kept)) == len(kept)
    assert np.bincount(labels[kept], minlength=4).tolist() == long_tail_counts(
        np.full(4, 50), 0.1
    ).tolist()


def test_largest_remainder_sums_to_total_and_follows_proportions():
    counts = largest_remainder(np.array([1.0, 1.0, 2.0]), 10)
    assert counts.sum() == 10
    assert counts.tolist() in ([3, 2, 5], [2, 3, 5])


def test_matched_test_set_follows_the_client_label_mix():
    train = np.array([0] * 30 + [1] * 10)
    pool = np.repeat(np.arange(3), 100)
    picked = matched_test_indices(train, pool, 3, 20, np.random.default_rng(0))
    assert np.bincount(pool[picked], minlength=3).tolist() == [15, 5, 0]


@pytest.mark.parametrize(
    "partitioner",
    [IidPartitioner(5), DirichletPartitioner(5, "label", alpha=0.3, min_partition_size=1, seed=1)],
)
def test_partitions_are_disjoint_and_cover_the_data(partitioner):
    labels = np.random.default_rng(0).integers(0, 4, size=200)
    partitioner.dataset = label_dataset(labels, 4)
    parts = partition_indices(partitioner, 5)
    everything = np.concatenate(parts)
    assert sorted(everything.tolist()) == list(range(200))


def test_partition_count_must_match_num_clients():
    partitioner = IidPartitioner(4)
    partitioner.dataset = label_dataset(np.zeros(20, dtype=np.int64), 1)
    with pytest.raises(ConfigError, match="num_clients=5"):
        partition_indices(partitioner, 5)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dirichlet_that_cannot_fill_clients_reports_the_partition_field():
    labels = np.random.default_rng(0).integers(0, 2, size=30)
    partitioner = DirichletPartitioner(10, "label", alpha=0.01, min_partition_size=5, seed=0)
    partitioner.dataset = label_dataset(labels, 2)
    with pytest.raises(ConfigError, match="partition"):
        partition_indices(partitioner, 10)


def test_dirichlet_redraws_are_one_log_line_not_a_warning_each(caplog, recwarn):
    labels = np.random.default_rng(0).integers(0, 10, size=4000)  # seed 3: two redraws
    partitioner = DirichletPartitioner(20, "label", alpha=0.05, min_partition_size=2, seed=3)
    partitioner.dataset = label_dataset(labels, 10)
    with caplog.at_level("WARNING", logger="fedsim"):
        parts = partition_indices(partitioner, 20)
    assert min(len(p) for p in parts) >= 2
    assert [str(w.message) for w in recwarn] == []
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("partition: 2 Dirichlet draw(s)") and "min_partition_size=2" in line


def test_contiguous_shards_cut_as_iid_partitioner_does():
    """10 samples in 3 shards: the first 10 % 3 = 1 shard gets the extra one (hand-worked),
    and every shard matches flwr-datasets' own per-partition read."""
    from fedsim.datasets.partition import INDEX, contiguous_shards, label_dataset

    shards = contiguous_shards(np.arange(10), 3)
    assert [s.tolist() for s in shards] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    for samples, parts in ((1003, 7), (40, 40), (5000, 999)):
        partitioner = IidPartitioner(num_partitions=parts)
        partitioner.dataset = label_dataset(np.arange(samples) % 5, 5)
        fast = contiguous_shards(partitioner.dataset.data.column(INDEX).to_numpy(), parts)
        for pid in (0, parts // 2, parts - 1):
            assert fast[pid].tolist() == list(partitioner.load_partition(pid)[INDEX])
