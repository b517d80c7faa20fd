"""Server cost of FedLD's aggregation against a plain mean, on ResNet-18-sized deltas.

    python scripts/bench_fedld_aggregation.py --clients 12 --repeat 3

Random float32 deltas shaped like CIFAR ResNet-18's state (11.2M entries); the
principal-gradient branch is timed (round 2, with a history), median of --repeat.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from fedsim.models import resnet18
from fedsim.strategies.fedld import FedLD


def random_deltas(num_clients: int, seed: int = 0) -> dict[str, np.ndarray]:
    state = resnet18(input_shape=[3, 32, 32], num_classes=10).state_dict()
    rng = np.random.default_rng(seed)
    return {key: rng.normal(size=(num_clients, *value.shape)).astype(np.float32)
            for key, value in state.items()}


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    deltas = random_deltas(args.clients)
    strategy = FedLD()
    strategy.aggregate_deltas(1, deltas)  # round 1 (mean) fills the history
    fedld = median_seconds(lambda: strategy.aggregate_deltas(2, deltas), args.repeat)
    mean = median_seconds(lambda: {k: d.mean(axis=0) for k, d in deltas.items()}, args.repeat)
    entries = sum(d[0].size for d in deltas.values()) / 1e6
    print(f"{entries:.2f}M entries, {args.clients} clients: FedLD {fedld:.3f} s, "
          f"plain mean {mean:.3f} s ({fedld / mean:.1f}x)")


if __name__ == "__main__":
    main()
