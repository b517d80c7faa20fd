"""Load checks: W2-sized populations with injected faults, counted against the seeded plan.

`run_load` runs one in-process fedsim run with `faults.crash_prob`, `nan_prob`,
`hang_prob` and a deadline, and returns what the server recorded next to what the
seeded fault plan (`fedsim.fault_injection.fault_plan` over `flower_cohorts`) says it
must record, round by round, with the process's memory after each round.
`scripts/load_faults.py` (full size) and `tests/test_load_faults.py` (CI size) use it.

Workload W2 (`../shared/specs/workloads.md`) is W1 with a large registered population:
MNIST-1D's training split resampled with replacement so that each client holds about
40 samples (`resampled_mnist1d`), split IID (`partition=iid`, which fedsim cuts in one
step: `fedsim.datasets.partition.contiguous_shards`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.datasets.base import ArraySplits, as_splits
from fedsim.fault_injection import CRASH, NAN, TIMEOUT, fault_plan, flower_cohorts

log = logging.getLogger("fedsim")

W2_SAMPLES_PER_CLIENT = 40
OTHER = "other"  # a recorded failure that is none of the injected kinds


def resampled_mnist1d(train_size: int, resample_seed: int = 0, data_seed: int = 42,
                      num_samples: int = 5000, train_split: float = 0.8) -> ArraySplits:
    """MNIST-1D (`fedsim.datasets.mnist1d.load`) with its training split resampled with
    replacement to `train_size` rows (W2); the test split is kept as it is."""
    from fedsim.datasets import mnist1d

    base = mnist1d.load(data_seed=data_seed, num_samples=num_samples, train_split=train_split)
    rows = np.random.default_rng([resample_seed, 0x3E2]).integers(
        0, len(base.y_train), train_size)
    return as_splits(base.x_train[rows], base.y_train[rows], base.x_test, base.y_test,
                     num_classes=base.num_classes, source="mnist1d (resampled)")


def memory_kib() -> tuple[int | None, int | None]:
    """(VmRSS, VmHWM) of this process in KiB from /proc/self/status; (None, ru_maxrss)
    where there is no /proc."""
    try:
        fields = dict(line.split(":", 1) for line in
                      Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        import resource

        return None, int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


@dataclass
class RoundSample:
    round: int
    time_s: float  # perf_counter when the round's metrics line was written
    rss_kib: int | None
    hwm_kib: int | None


@dataclass
class Probe:
    """What one run reports as it goes: memory after each round and each failure the
    server logged, with its round."""

    samples: list[RoundSample] = field(default_factory=list)
    failures: list[tuple[int, int, str]] = field(default_factory=list)  # round, node, outcome
    unattributed: int = 0  # failures logged only as "... and N more" (should stay 0)

    @property
    def current_round(self) -> int:
        return self.samples[-1].round + 1 if self.samples else 0


_ACTIVE: list[Probe] = []


class RoundProbe:
    """A `logger` (fedsim.loggers interface) that samples memory at each round's end."""

    def start(self, config: dict[str, Any], run_dir: str, name: str) -> None:
        """Nothing to open."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        if _ACTIVE:
            rss, hwm = memory_kib()
            _ACTIVE[-1].samples.append(RoundSample(step, time.perf_counter(), rss, hwm))

    def finish(self, summary: dict[str, Any], failed: bool = False) -> None:
        """Nothing to close."""


class FailureLog(logging.Handler):
    """Reads the server's failure warnings (`fedsim.backends.base.MeteredGrid`) into the
    active probe: the node, and crash / NaN / timeout from the logged cause."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _ACTIVE:
            return
        probe, text = _ACTIVE[-1], str(record.msg)
        if text.startswith("client node %d failed") and len(record.args) == 3:
            node, kind, cause = record.args
            if kind == "train":
                outcome = CRASH if "InjectedFaultError" in cause else \
                    NAN if "must be finite" in cause else OTHER
                probe.failures.append((probe.current_round, int(node), outcome))
        elif text.startswith("client node(s) %s sent no %s reply") and record.args[1] == "train":
            probe.failures.extend((probe.current_round, int(n), TIMEOUT)
                                  for n in record.args[0])
        elif text.startswith("... and %d more client failures"):
            probe.unattributed += int(record.args[0])


@contextlib.contextmanager
def probing() -> Iterator[Probe]:
    """A fresh probe, fed while inside; every failure logged with its node (the server
    logs only the first few of a round otherwise)."""
    from fedsim.backends import base

    probe, handler, cap = Probe(), FailureLog(level=logging.WARNING), base.MAX_LOGGED_FAILURES
    _ACTIVE.append(probe)
    log.addHandler(handler)
    base.MAX_LOGGED_FAILURES = 1 << 30
    try:
        yield probe
    finally:
        base.MAX_LOGGED_FAILURES = cap
        log.removeHandler(handler)
        _ACTIVE.remove(probe)


@dataclass(frozen=True)
class LoadSpec:
    """One load run: W2 (100,000 clients, 100 a round, 20 rounds) by default."""

    num_clients: int = 100_000
    clients_per_round: int = 100
    num_rounds: int = 20
    samples_per_client: int = W2_SAMPLES_PER_CLIENT
    seed: int = 0
    crash_prob: float = 0.10
    nan_prob: float = 0.05
    hang_prob: float = 0.05
    hang_s: float = 1.0
    timeout_s: float = 0.5

    def overrides(self, output_dir: str | Path) -> list[str]:
        return [
            "+experiment=w1", "progress=false", "logger._target_=fedsim.loadtest.RoundProbe",
            f"num_clients={self.num_clients}", f"clients_per_round={self.clients_per_round}",
            f"num_rounds={self.num_rounds}", f"seed={self.seed}",
            "dataset._target_=fedsim.loadtest.resampled_mnist1d",
            f"+dataset.train_size={self.num_clients * self.samples_per_client}",
            "partition=iid",
            f"faults.crash_prob={self.crash_prob}", f"faults.nan_prob={self.nan_prob}",
            f"faults.hang_prob={self.hang_prob}", f"faults.hang_s={self.hang_s}",
            f"faults.timeout_s={self.timeout_s}", f"output_dir={output_dir}",
        ]


@dataclass
class LoadResult:
    spec: LoadSpec
    summary: dict[str, Any]
    rows: list[dict[str, Any]]  # metrics.jsonl
    probe: Probe
    start_s: float  # perf_counter before run_experiment
    end_s: float
    expected: dict[int, dict[int, str]]  # round -> {partition: outcome}, from the plan

    @property
    def wall_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def setup_s(self) -> float:
        """From the call to round 0's line: config, data, partitions, model, plots."""
        return self.probe.samples[0].time_s - self.start_s

    def recorded(self) -> dict[int, dict[int, str]]:
        """round -> {partition: outcome} as the server logged them (node i + 1 holds
        partition i)."""
        out: dict[int, dict[int, str]] = {r: {} for r in self.expected}
        for server_round, node, outcome in self.probe.failures:
            out.setdefault(server_round, {})[node - 1] = outcome
        return out

    def count_rows(self) -> list[dict[str, Any]]:
        """Per round: expected and recorded counts of each outcome, and `train_failures`
        from metrics.jsonl."""
        recorded, rows = self.recorded(), []
        by_round = {row["round"]: row for row in self.rows}
        for r in sorted(self.expected):
            want, got = Counter(self.expected[r].values()), Counter(recorded.get(r, {}).values())
            rows.append({
                "round": r,
                **{f"expected_{k}": want[k] for k in (CRASH, NAN, TIMEOUT)},
                **{f"recorded_{k}": got[k] for k in (CRASH, NAN, TIMEOUT, OTHER)},
                "expected_failures": sum(want.values()),
                "train_failures": by_round.get(r, {}).get("train_failures"),
                "skipped_rounds": by_round.get(r, {}).get("skipped_rounds"),
                "round_time_s": by_round.get(r, {}).get("round_time_s"),
            })
        return rows

    def mismatches(self) -> list[str]:
        """Every way the run differs from the plan (empty: it matches exactly)."""
        problems = []
        recorded = self.recorded()
        for r in sorted(set(self.expected) | set(recorded)):
            want, got = self.expected.get(r, {}), recorded.get(r, {})
            if want != got:
                missing = sorted(set(want.items()) - set(got.items()))[:5]
                extra = sorted(set(got.items()) - set(want.items()))[:5]
                problems.append(f"round {r}: expected but not recorded {missing}, recorded "
                                f"but not expected {extra}")
        for row in self.count_rows():
            if row["train_failures"] != row["expected_failures"]:
                problems.append(f"round {row['round']}: metrics.jsonl train_failures="
                                f"{row['train_failures']}, plan {row['expected_failures']}")
        total = sum(len(v) for v in self.expected.values())
        if self.summary.get("train_failures") != total:
            problems.append(f"summary.json train_failures={self.summary.get('train_failures')},"
                            f" plan {total}")
        if self.probe.unattributed:
            problems.append(f"{self.probe.unattributed} failures logged without a node")
        if self.summary.get("num_rounds") != self.spec.num_rounds:
            problems.append(f"the run stopped at round {self.summary.get('num_rounds')}")
        return problems

    def rss_mib(self, server_round: int) -> float | None:
        """VmRSS after `server_round`, in MiB."""
        for sample in self.probe.samples:
            if sample.round == server_round and sample.rss_kib is not None:
                return sample.rss_kib / 1024
        return None


def expected_plan(spec: LoadSpec) -> dict[int, dict[int, str]]:
    """The plan of `spec`'s run, from its seed alone: Flower's cohorts, then each client's
    seeded draw and what the server makes of it."""
    from omegaconf import OmegaConf

    faults = OmegaConf.create({"crash_prob": spec.crash_prob, "nan_prob": spec.nan_prob,
                               "hang_prob": spec.hang_prob, "hang_s": spec.hang_s})
    cohorts = flower_cohorts(spec.seed, spec.num_clients, spec.clients_per_round,
                             spec.num_rounds)
    return fault_plan(faults, spec.seed, cohorts, spec.timeout_s)


def run_load(spec: LoadSpec, output_dir: str | Path, extra: Sequence[str] = ()) -> LoadResult:
    """Run `spec` in this process (backend `inprocess`) and collect what it recorded."""
    import json

    from fedsim.config import compose
    from fedsim.experiment import run_experiment

    expected = expected_plan(spec)
    cfg = compose([*spec.overrides(output_dir), *extra])
    with probing() as probe:
        start = time.perf_counter()
        summary = run_experiment(cfg)
        end = time.perf_counter()
    rows = [json.loads(line) for line in
            (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return LoadResult(spec, summary, rows, probe, start, end, expected)
