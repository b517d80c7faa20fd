"""Population-scale partitioning: each client resamples the train split with replacement.

`partition=resample` gives every one of `num_clients` clients `samples_per_client`
indices drawn with replacement from the whole training split, from a generator
seeded by (run seed, client). Nothing is drawn up front: a client's indices are
drawn the first time it is asked for, so a run with 100,000 registered clients
costs what its sampled cohorts cost (workload W2, ../shared/specs/workloads.md).
Unlike the other partitioners, `num_clients` may exceed the number of samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import Partitioner

from fedsim.errors import is_int, require

#: mixed into every client's seed, so the draws share no stream with other per-client draws
_SALT = 0x5E5A


def resample_positions(seed: int, client: int, pool_size: int, size: int) -> np.ndarray:
    """Client `client`'s `size` positions in a pool of `pool_size`, drawn with replacement,
    sorted (the same for the same seed and client, whatever else was drawn before)."""
    rng = np.random.default_rng([seed, client, _SALT])
    return np.sort(rng.integers(0, pool_size, size=size, dtype=np.int64))


class ResampledParts(Sequence[np.ndarray]):
    """Every client's training indices into the train split, drawn on first use.

    `pool` holds the train-split indices clients draw from (all of them, or those a
    long-tail step kept); item i is `pool[resample_positions(seed, i, ...)]`. Only the
    clients asked for are drawn and remembered (`drawn`).
    """

    def __init__(self, pool: np.ndarray, num_clients: int, part_size: int, seed: int) -> None:
        self.pool = np.asarray(pool, dtype=np.int64)
        self.num_clients = num_clients
        self.part_size = part_size
        self.seed = seed
        self.drawn: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_clients

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, index: slice) -> list[np.ndarray]: ...

    def __getitem__(self, index: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.num_clients))]
        client = int(index) + (self.num_clients if index < 0 else 0)
        if not 0 <= client < self.num_clients:
            raise IndexError(f"client {index} outside [0, {self.num_clients - 1}]")
        part = self.drawn.get(client)
        if part is None:
            part = self.pool[resample_positions(self.seed, client, len(self.pool),
                                                self.part_size)]
            self.drawn[client] = part
        return part

    def __reduce__(self) -> tuple:
        """Pickled (Ray's object store) without the draws: they are redrawn on use."""
        return (ResampledParts, (self.pool, self.num_clients, self.part_size, self.seed))


class ResamplePartitioner(Partitioner):
    """`partition=resample`: `samples_per_client` training samples per client, drawn with
    replacement from the whole train split with a generator seeded by (seed, client).

    A flwr-datasets `Partitioner` (so the label-distribution plot reads it), but fedsim
    reads the clients' indices from `parts`, lazily.
    """

    #: num_clients may exceed the training samples, and `parts` gives the clients' indices
    #: (read by `fedsim.datasets.federated`, which partitions everything else itself)
    draws_with_replacement = True

    def __init__(self, num_partitions: int, samples_per_client: int = 40, seed: int = 0
                 ) -> None:
        super().__init__()
        require(is_int(num_partitions) and num_partitions >= 1, "num_clients",
                "an integer >= 1", num_partitions)
        require(is_int(samples_per_client) and samples_per_client >= 1,
                "partition.samples_per_client", "an integer >= 1", samples_per_client)
        require(is_int(seed), "seed", "an integer", seed)
        self._num_partitions = num_partitions
        self.samples_per_client = samples_per_client
        self.seed = seed

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def load_partition(self, partition_id: int) -> Dataset:
        """Partition `partition_id` of the assigned dataset (its rows, repeats included)."""
        positions = resample_positions(self.seed, partition_id, len(self.dataset),
                                       self.samples_per_client)
        return self.dataset.select(positions.tolist())

    def parts(self, pool: np.ndarray) -> ResampledParts:
        """The clients' indices into the train split, drawn lazily from `pool` (the
        train-split indices this partitioner's dataset rows stand for)."""
        return ResampledParts(pool, self._num_partitions, self.samples_per_client, self.seed)
