"""A large registered population with injected faults: the run completes and the server
records exactly the seeded fault plan (scripts/load_faults.py at CI size)."""

from __future__ import annotations

import random
from collections import Counter

from omegaconf import OmegaConf

from fedsim.fault_injection import (
    CRASH,
    NAN,
    TIMEOUT,
    FaultDraw,
    fault_outcome,
    fault_plan,
    flower_cohorts,
    plan_counts,
)
from fedsim.loadtest import LoadSpec, expected_plan, run_load

FAULTS = OmegaConf.create({"crash_prob": 0.1, "nan_prob": 0.05, "hang_prob": 0.05,
                           "hang_s": 0.5})


def test_a_hang_past_the_deadline_loses_the_reply_whatever_else_was_drawn():
    assert fault_outcome(FaultDraw(True, False, 0.5), 0.25) == TIMEOUT
    assert fault_outcome(FaultDraw(False, True, 0.5), 0.25) == TIMEOUT
    assert fault_outcome(FaultDraw(True, False, 0.0), 0.25) == CRASH
    assert fault_outcome(FaultDraw(False, True, 0.0), 0.25) == NAN
    assert fault_outcome(FaultDraw(False, False, 0.1), 0.25) is None  # within the deadline
    assert fault_outcome(FaultDraw(False, False, 0.5), None) is None  # no deadline
    assert fault_outcome(FaultDraw(False, False, 0.0), 0.25) is None


def test_flower_cohorts_replay_the_servers_sampling():
    """fedsim seeds `random` with the run's seed; Flower samples sorted node ids."""
    random.seed(7)
    nodes = list(range(1, 1001))
    drawn = {}
    for r in (1, 2, 3):
        drawn[r] = sorted(n - 1 for n in random.sample(nodes, 10))
        random.sample(nodes, 4)  # client evaluation
    assert flower_cohorts(7, 1000, 10, 3, evaluate_per_round=4) == drawn
    assert flower_cohorts(7, 1000, 10, 3) != drawn


def test_the_plan_is_pure_and_near_its_rates():
    cohorts = flower_cohorts(0, 100_000, 100, 20)
    plan = fault_plan(FAULTS, 0, cohorts, timeout_s=0.25)
    assert plan == fault_plan(FAULTS, 0, cohorts, timeout_s=0.25)
    assert plan != fault_plan(FAULTS, 1, cohorts, timeout_s=0.25)
    totals = sum(plan_counts(plan).values(), Counter())
    # 2000 messages: hang 5%, then crash 10% and NaN 5% of the rest
    assert 60 < totals[TIMEOUT] < 140 and 140 < totals[CRASH] < 240 and 50 < totals[NAN] < 140


def test_100k_clients_with_faults_record_exactly_the_seeded_plan(tmp_path):
    """100,000 registered clients (2 samples each), 30 a round, 4 rounds: crash 10%, NaN
    5%, hang 5% past a short deadline. Every failure the server records, by round, node
    and kind, and every round's train_failures, equals the plan computed beforehand."""
    spec = LoadSpec(num_clients=100_000, clients_per_round=30, num_rounds=4,
                    samples_per_client=2, hang_s=0.5, timeout_s=0.25)
    expected = expected_plan(spec)
    totals = sum(plan_counts(expected).values(), Counter())
    assert totals[CRASH] and totals[NAN] and totals[TIMEOUT]  # each kind is exercised
    result = run_load(spec, tmp_path / "run")
    assert result.summary["num_rounds"] == 4
    assert result.expected == expected
    assert result.mismatches() == []
    assert result.summary["train_failures"] == sum(totals.values())
    # a hung client costs its hang, not more: each round ends within its hangs plus slack
    for row in result.count_rows():
        assert row["round_time_s"] < row["expected_timeout"] * spec.hang_s + 10
