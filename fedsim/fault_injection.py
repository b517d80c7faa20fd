"""Faults injected on the client side, to exercise the server's reply check.

`inject_faults` is the client side of `faults.crash_prob`, `nan_prob`,
`hang_prob`: drawn from (seed, partition, round), so the same clients fail on
every backend and on every rerun. `poisoned` is the upload of a client drawn to
send NaN. What the server makes of such replies is `fedsim.reply_check`.

`fault_plan` says, without running anything, which (round, partition) pairs of a
run fail and how the server records each (`fault_outcome`); `flower_cohorts`
replays the cohorts that Flower's FedAvg-family sampling draws in a fedsim run,
so that a run's expected failure counts can be computed from its config alone.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

FAULT_STREAM = 0xFA017  # keeps fault draws apart from the training seeds
#: how the server records a faulty train message (`fault_outcome`)
CRASH, NAN, TIMEOUT = "crash", "nan", "timeout"


class InjectedFaultError(RuntimeError):
    """A client failure injected by `faults.crash_prob`."""


@dataclass(frozen=True)
class FaultDraw:
    """What happens to one train message: crash, upload NaN, sleep first."""

    crash: bool
    nan: bool
    hang_s: float


def draw_faults(faults, seed: int, partition_id: int, server_round: int) -> FaultDraw:
    """The faults of this client in this round, drawn from (seed, partition, round) only."""
    crash_prob, nan_prob = float(faults.crash_prob), float(faults.nan_prob)
    hang_prob = float(faults.hang_prob)
    if crash_prob == nan_prob == hang_prob == 0:
        return FaultDraw(False, False, 0.0)
    rng = np.random.default_rng([FAULT_STREAM, seed, partition_id, server_round])
    kind, hang = rng.random(2)
    return FaultDraw(
        crash=kind < crash_prob,
        nan=crash_prob <= kind < crash_prob + nan_prob,
        hang_s=float(faults.hang_s) if hang < hang_prob else 0.0,
    )


def fault_outcome(fault: FaultDraw, timeout_s: float | None) -> str | None:
    """How the server records a train message with this draw: `TIMEOUT` when the client
    hangs longer than the deadline `timeout_s` (its reply is lost, whatever else was
    drawn), else `CRASH` (an error reply), else `NAN` (dropped by the reply check); None
    for a valid reply.

    A hang no longer than the deadline is not a fault here. It is exact when `hang_s` is
    either above `timeout_s` or below it by more than a client's own time; in between,
    whether the reply is late depends on the machine.
    """
    if fault.hang_s and timeout_s is not None and fault.hang_s > timeout_s:
        return TIMEOUT
    if fault.crash:
        return CRASH
    if fault.nan:
        return NAN
    return None


def fault_plan(faults, seed: int, cohorts: Mapping[int, Iterable[int]],
               timeout_s: float | None) -> dict[int, dict[int, str]]:
    """round -> {partition id: outcome} for every faulty train message of `cohorts`
    (round -> the partition ids sent a train message that round); pure, from the seed.

    `faults` is the `faults` config (`timeout_s` is passed apart, as the deadline the
    run uses); clients without a fault are left out.
    """
    plan: dict[int, dict[int, str]] = {}
    for server_round, partitions in cohorts.items():
        outcomes = {}
        for partition in partitions:
            outcome = fault_outcome(draw_faults(faults, seed, partition, server_round), timeout_s)
            if outcome is not None:
                outcomes[int(partition)] = outcome
        plan[int(server_round)] = outcomes
    return plan


def plan_counts(plan: Mapping[int, Mapping[int, str]]) -> dict[int, Counter[str]]:
    """round -> {outcome: count} of a `fault_plan`."""
    return {r: Counter(outcomes.values()) for r, outcomes in plan.items()}


def flower_cohorts(seed: int, num_clients: int, clients_per_round: int, num_rounds: int,
                   evaluate_per_round: int = 0) -> dict[int, list[int]]:
    """round -> the partition ids trained that round in a fedsim run of a synchronous
    FedAvg-family strategy (Flower's `sample_nodes`) on a backend where node i + 1 holds
    partition i (`partition_node_ids`: inprocess, ray).

    The server seeds Python's `random` with the run's seed, and Flower then draws
    `random.sample(sorted node ids, k)` for training each round, and again for
    evaluation when `evaluation.clients_per_round` (`evaluate_per_round`) > 0. The
    stale strategies and attacks draw otherwise, so this does not replay them.
    """
    rng = random.Random(seed)
    nodes = list(range(1, num_clients + 1))
    cohorts = {}
    for server_round in range(1, num_rounds + 1):
        cohorts[server_round] = sorted(node - 1 for node in rng.sample(nodes, clients_per_round))
        if evaluate_per_round > 0:
            rng.sample(nodes, evaluate_per_round)
    return cohorts


def inject_faults(faults, seed: int, partition_id: int, server_round: int) -> FaultDraw:
    """Sleep or raise as drawn for this train message; the caller poisons the upload."""
    fault = draw_faults(faults, seed, partition_id, server_round)
    if fault.hang_s:
        time.sleep(fault.hang_s)
    if fault.crash:
        raise InjectedFaultError(f"injected crash (faults.crash_prob) in round {server_round}")
    return fault


def poisoned(arrays: ArrayRecord) -> ArrayRecord:
    """`arrays` with every floating entry set to NaN (what a diverged client uploads), and
    every integer one to its dtype's largest value (no valid ranking, for rank-uploading
    clients)."""
    out = {}
    for key, array in arrays.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating):
            values = np.full_like(values, np.nan)
        elif np.issubdtype(values.dtype, np.integer):
            values = np.full_like(values, np.iinfo(values.dtype).max)
        out[key] = Array(values)
    return ArrayRecord(out)
