"""The in-process backend's worker pool (`backend.workers`) and batched cohorts
(`backend.batched`): the same runs as one process training one client at a time."""

import logging
import math

import pytest
from conftest import read_metrics, without_timing

from fedsim.errors import ConfigError
from fedsim.experiment import run_experiment
from fedsim.fault_injection import draw_faults

# A batched cohort sums float32 products in another order than one client's training, so
# its weights differ from the sequential run's in the last bits, and the round metrics
# computed from them by as much (see tests/test_cohort.py for the weights themselves, and
# for a conv net, whose batched convolutions round differently enough that a 3-round run
# drifts by ~1e-5: there the two paths agree to 1e-12 in float64).
REL = 1e-5


def metrics_of(cfg) -> list[dict]:
    run_experiment(cfg)
    return without_timing(read_metrics(cfg.output_dir))


def assert_close_rows(rows: list[dict], expected: list[dict]) -> None:
    assert [set(r) for r in rows] == [set(r) for r in expected]
    for row, want in zip(rows, expected, strict=True):
        for key, value in want.items():
            assert math.isclose(row[key], value, rel_tol=REL, abs_tol=1e-7), (key, row, want)


@pytest.mark.parametrize("method", [
    [],  # FedAvg with SGD
    ["method=ditto"],  # personalized: each client's own model lives in its context state
    ["strategy=scaffold", "client=scaffold"],  # control variates in state, extra records
])
def test_a_pool_of_workers_gives_the_one_process_run_exactly(tiny_cfg, method):
    overrides = [*method, "num_rounds=3", "client.momentum=0.9"]
    one = metrics_of(tiny_cfg(*overrides))
    assert metrics_of(tiny_cfg(*overrides, "backend.workers=2")) == one


@pytest.mark.parametrize("method", [
    ["client.momentum=0.9"],
    ["strategy=fedprox", "client.momentum=0.9", "client.weight_decay=0.001"],
])
def test_a_batched_cohort_gives_the_sequential_run(tiny_cfg, method, monkeypatch, caplog):
    from fedsim.clients.sgd import SGDTrainer

    cohorts = []
    together = SGDTrainer._train_together

    def counted(self, jobs, settings):
        cohorts.append(len(jobs))
        return together(self, jobs, settings)

    monkeypatch.setattr(SGDTrainer, "_train_together", counted)
    overrides = [*method, "num_rounds=3"]
    sequential = metrics_of(tiny_cfg(*overrides))
    assert cohorts == []
    assert_close_rows(metrics_of(tiny_cfg(*overrides, "backend.batched=true")), sequential)
    assert cohorts == [3, 3, 3]  # clients_per_round=3, once a round
    with caplog.at_level(logging.INFO, logger="fedsim"):  # each worker batches its share
        both = metrics_of(tiny_cfg(*overrides, "backend.batched=true", "backend.workers=2"))
    assert_close_rows(both, sequential)
    assert "backend.batched" not in caplog.text


def test_a_trainer_that_cannot_be_batched_trains_one_by_one_and_says_why(tiny_cfg, caplog):
    overrides = ["method=ditto", "num_rounds=2"]
    sequential = metrics_of(tiny_cfg(*overrides))
    with caplog.at_level(logging.INFO, logger="fedsim"):
        batched = metrics_of(tiny_cfg(*overrides, "backend.batched=true"))
    assert batched == sequential
    told = [r.getMessage() for r in caplog.records if "backend.batched" in r.getMessage()]
    assert len(told) == 1 and "DittoTrainer" in told[0], told


def test_injected_faults_run_one_by_one_with_the_same_outcome(tiny_cfg, caplog):
    overrides = ["faults.crash_prob=0.3", "faults.nan_prob=0.2", "num_rounds=3"]
    sequential = metrics_of(tiny_cfg(*overrides))
    with caplog.at_level(logging.INFO, logger="fedsim"):
        batched = metrics_of(tiny_cfg(*overrides, "backend.batched=true", "backend.workers=2"))
    assert batched == sequential and sum(r.get("train_failures", 0) for r in sequential) > 0
    assert "faults.crash_prob" in caplog.text


def test_a_late_reply_in_a_worker_is_lost_with_its_state(tiny_cfg):
    """Ditto keeps each client's own model in its context: a hung client's reply and its
    state update are lost in a worker as in one process (hang 1 s > deadline 0.6 s, and
    no client's training comes near 0.6 s, so which replies are late is certain: a 0.3 s
    deadline was once missed by an unhung client on a machine running 3 test workers on
    2 cores)."""
    overrides = ["method=ditto", "faults.hang_prob=0.5", "faults.hang_s=1.0",
                 "faults.timeout_s=0.6", "num_rounds=3"]
    cfg = tiny_cfg(*overrides)
    hung = sum(bool(draw_faults(cfg.faults, cfg.seed, p, r).hang_s)
               for r in (1, 2, 3) for p in range(6))
    one = metrics_of(cfg)
    pooled = metrics_of(tiny_cfg(*overrides, "backend.workers=2"))
    assert hung and sum(r.get("train_failures", 0) for r in one) > 0
    assert pooled == one


@pytest.mark.parametrize(("override", "says"), [
    ("backend.workers=0", "an integer >= 1 or auto"),
    ("backend.workers=two", "an integer >= 1 or auto"),
    ("backend.batched=3", "true or false"),
])
def test_bad_pool_settings_are_refused_naming_the_field(tiny_cfg, override, says):
    with pytest.raises(ConfigError, match=rf"backend\.\w+.*{says}"):
        run_experiment(tiny_cfg(override))
