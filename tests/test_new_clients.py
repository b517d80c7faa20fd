"""Held-out new clients (`evaluation.new_clients`): never trained, evaluated every round."""

from __future__ import annotations

import pytest

from fedsim.engine_strategy import held_out_nodes
from fedsim.errors import ConfigError
from fedsim.experiment import run_experiment
from fedsim.runtime import preflight
from tests.conftest import read_metrics
from tests.helpers import PartitionRecordingTrainer


def test_held_out_nodes_are_the_last_partitions():
    assert held_out_nodes(0.25, 8) == frozenset({7, 8})  # partitions 6 and 7
    assert held_out_nodes(0.0, 8) == frozenset()
    assert held_out_nodes(0.1, 20) == frozenset({19, 20})


@pytest.mark.parametrize("k_eval", [2, 0])
def test_new_clients_never_train_and_are_evaluated_every_round(tiny_cfg, k_eval):
    PartitionRecordingTrainer.trained.clear()
    PartitionRecordingTrainer.evaluated.clear()
    cfg = tiny_cfg("num_clients=8", "clients_per_round=6", "num_rounds=3",
                   "evaluation.new_clients=0.25", f"evaluation.clients_per_round={k_eval}",
                   "client._target_=tests.helpers.PartitionRecordingTrainer")
    run_experiment(cfg)
    assert set(PartitionRecordingTrainer.trained) == set(range(6))  # all six, never 6 or 7
    assert PartitionRecordingTrainer.evaluated.count(6) == 3  # every round
    assert PartitionRecordingTrainer.evaluated.count(7) == 3
    rows = [r for r in read_metrics(cfg.output_dir) if r["round"] >= 1]
    assert all(0 <= r["client_eval/new-mean-accuracy"] <= 1 for r in rows)
    assert all(r["client_eval/new-worst10-accuracy"] <= r["client_eval/new-best10-accuracy"]
               for r in rows)
    assert all(("client_eval/mean-accuracy" in r) == (k_eval > 0) for r in rows)


@pytest.mark.parametrize("overrides", [
    ["evaluation.new_clients=1.0"],
    ["evaluation.new_clients=0.05"],  # holds out nobody of 6
    ["evaluation.new_clients=0.5"],   # 3 left for a cohort of 3 and evaluation of 2: fine
    ["evaluation.new_clients=0.67"],  # 2 left for a cohort of 3
    ["evaluation.new_clients=0.25", "backend=flower"],
])
def test_shares_that_cannot_work_are_refused(tiny_cfg, overrides):
    cfg = tiny_cfg(*overrides)
    if overrides == ["evaluation.new_clients=0.5"]:
        preflight(cfg)
        return
    with pytest.raises(ConfigError, match=r"^evaluation\.new_clients must be"):
        preflight(cfg)
