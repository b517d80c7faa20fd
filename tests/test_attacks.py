"""Poisoning attacks: who is malicious, cohort redraws, the collusion grid, each attack's math."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import read_metrics
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedTrimmedAvg, MultiKrum
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from fedsim.attacks.base import AdversarialGrid, malicious_nodes
from fedsim.attacks.rank_reversal import RankReversal, reversed_consensus
from fedsim.attacks.scaling import Scaling
from fedsim.attacks.tailored import AggregationTailored, multikrum_criterion, search_gamma
from fedsim.backends.base import SimulationGrid
from fedsim.config import compose, validate
from fedsim.engine_strategy import EngineStrategy
from fedsim.errors import ConfigError
from fedsim.experiment import run_experiment
from fedsim.runtime import preflight
from fedsim.strategies.frl import borda_order


def test_malicious_clients_are_the_lowest_ids():
    assert malicious_nodes(0.1, 50) == frozenset(range(1, 6))  # partitions 0..4
    assert malicious_nodes(0.2, 12) == frozenset({1, 2})  # int(2.4)
    assert malicious_nodes(0.0, 50) == frozenset()


class Nodes:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def test_cohorts_with_half_or_more_malicious_are_redrawn():
    import random

    random.seed(0)
    strategy = FedAvg(fraction_train=0.4, min_train_nodes=4, min_available_nodes=10)
    malicious = frozenset({1, 2, 3, 4})
    strategy = EngineStrategy(strategy, malicious=malicious)
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    counts = []
    for round_ in range(1, 200):
        cohort = [m.metadata.dst_node_id for m in
                  strategy.configure_train(round_, arrays, ConfigRecord(), Nodes(10))]
        assert len(cohort) == 4
        counts.append(sum(node in malicious for node in cohort))
    assert max(counts) == 1 and 1 in counts  # at most 1 of 4 ever; 2 would be half


# --- the math of each attack -----------------------------------------------------------


def test_reversed_consensus_hand_worked():
    rankings = np.array([[0, 1, 2], [0, 2, 1]], np.uint8)  # positions sum: 0, 3, 3
    np.testing.assert_array_equal(reversed_consensus(rankings), [1, 2, 0])
    assert reversed_consensus(rankings).dtype == np.uint8


@pytest.mark.parametrize("benign, attackers", [(3, 2), (5, 4), (4, 1)])
def test_fewer_reversed_attackers_leave_an_agreed_order_unchanged(benign, attackers):
    rng = np.random.default_rng(benign)
    agreed = rng.permutation(30)
    forged = reversed_consensus(np.stack([agreed] * attackers))
    np.testing.assert_array_equal(forged, agreed[::-1])
    votes = np.stack([agreed] * benign + [forged] * attackers)
    np.testing.assert_array_equal(borda_order(votes), agreed)


def test_as_many_reversed_attackers_as_benign_erase_the_order():
    agreed = np.random.default_rng(0).permutation(10)
    votes = np.stack([agreed, agreed, agreed[::-1], agreed[::-1]])
    np.testing.assert_array_equal(borda_order(votes), np.arange(10))  # all tied: id order


def test_search_gamma_finds_the_success_boundary():
    assert search_gamma(lambda g: g <= 2.3) == pytest.approx(2.3, abs=1e-4)
    assert search_gamma(lambda g: False) == 0.0
    assert search_gamma(lambda g: True, start=5.0, tol=1e-5) == pytest.approx(10.0, abs=1e-4)


def test_krum_tailored_upload_is_selected_and_deviates():
    rng = np.random.default_rng(1)
    honest = rng.normal(size=(6, 20))
    deviation = honest.std(axis=0, ddof=1)
    succeeds = multikrum_criterion(honest, deviation, copies=2, num_malicious_nodes=2,
                                   num_nodes_to_select=4)
    gamma = search_gamma(succeeds)
    assert gamma > 0 and succeeds(gamma)


def test_krum_that_selects_one_update_can_still_be_attacked():
    rng = np.random.default_rng(3)
    honest = rng.normal(size=(6, 20))
    succeeds = multikrum_criterion(honest, honest.std(axis=0, ddof=1), copies=3,
                                   num_malicious_nodes=2, num_nodes_to_select=1)
    assert search_gamma(succeeds) > 0  # success = the one selected update is a copy


def test_trimmed_mean_tailored_upload_pulls_the_aggregate_away():
    rng = np.random.default_rng(2)
    honest = [{"w": rng.normal(0.5, 1.0, size=(4, 5))} for _ in range(8)]
    attack = AggregationTailored(fraction=0.2)
    attack.prepare(FedTrimmedAvg(beta=0.2))
    forged = attack.craft(honest, {"w": np.zeros((4, 5))}, num_malicious=2)["w"]
    stacked = np.stack([h["w"] for h in honest])
    mean = stacked.mean(axis=0)
    attacked = trim_mean(np.concatenate([np.stack([forged] * 2), stacked]), 0.2)
    assert attack.last_gamma > 0
    assert np.linalg.norm(attacked - mean) > np.linalg.norm(trim_mean(stacked, 0.2) - mean)


def test_tailored_attack_refuses_a_rule_it_cannot_simulate():
    with pytest.raises(ConfigError, match="strategy must be one of"):
        AggregationTailored().prepare(FedAvg())
    AggregationTailored().prepare(MultiKrum())


def test_scaling_update_is_a_multiple_of_the_global_model():
    w = {"w": np.array([1.0, -2.0])}
    assert Scaling(factor=1e5).craft([{"w": np.zeros(2)}], w, 1)["w"].tolist() == [1e5, -2e5]


# --- the collusion grid ----------------------------------------------------------------


class EchoGrid(SimulationGrid):
    """Each node 'trains' by uploading w + node_id; records who was asked."""

    def __init__(self, n: int) -> None:
        super().__init__(n, {})
        self.asked: list[int] = []

    def execute(self, messages, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.asked.append(node)
            w = msg.content["arrays"]["w"].numpy()
            content = RecordDict({
                "arrays": ArrayRecord({"w": Array((w + node).astype(np.float32)),
                                       "n": Array(np.array(node, np.int64))}),
                "metrics": MetricRecord({"num-examples": 1}),
            })
            reply = Message(content, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def _train_messages(grid, nodes, w):
    content = RecordDict({"arrays": ArrayRecord({"w": Array(w)}),
                          "config": ConfigRecord({"server-round": 1})})
    return [grid.create_message(content, "train", node, "1") for node in nodes]


def test_grid_forges_only_the_round_malicious_replies_and_hides_extra_colluders():
    inner = EchoGrid(10)
    attack = Scaling(fraction=0.3, colluders=3, factor=10.0)
    grid = AdversarialGrid(inner, attack, frozenset({1, 2, 3}), "weights", seed=0)
    w = np.array([1.0, 2.0], np.float32)
    replies = grid.send_and_receive(_train_messages(grid, [2, 5, 7], w))
    by_node = {r.metadata.src_node_id: r.content["arrays"] for r in replies}
    assert sorted(by_node) == [2, 5, 7]  # the extra colluders' replies never reach the server
    assert sorted(inner.asked) == [1, 2, 3, 5, 7]  # ... but they trained
    np.testing.assert_array_equal(by_node[2]["w"].numpy(), w + 10 * w)  # upload = w + update
    assert by_node[2]["w"].numpy().dtype == np.float32 and int(by_node[2]["n"].numpy()) == 2
    np.testing.assert_array_equal(by_node[5]["w"].numpy(), w + 5)  # benign untouched
    inner.asked.clear()
    replies = grid.send_and_receive(_train_messages(grid, [5, 7], w))
    assert sorted(inner.asked) == [5, 7]  # no malicious client in the round: no collusion


def test_rank_reversal_grid_submits_the_reversed_pooled_ranking():
    class RankGrid(EchoGrid):
        def execute(self, messages, timeout=None):
            replies = super().execute(messages)
            for reply in replies:
                reply.content["arrays"] = ArrayRecord(
                    {"s": Array(np.array([0, 1, 2, 3], np.uint8))})
            return replies

    inner = RankGrid(6)
    grid = AdversarialGrid(inner, RankReversal(fraction=0.34, colluders=2), frozenset({1, 2}),
                           "rankings", seed=0)
    replies = grid.send_and_receive(_train_messages(grid, [1, 4, 5], np.zeros(1, np.float32)))
    uploads = {r.metadata.src_node_id: r.content["arrays"]["s"].numpy().tolist() for r in replies}
    assert uploads == {1: [3, 2, 1, 0], 4: [0, 1, 2, 3], 5: [0, 1, 2, 3]}


# --- config and runs -------------------------------------------------------------------


def test_config_refuses_attacks_that_cannot_apply(tiny_cfg):
    """Range checks in validate; what an attack needs of other groups in its check(spec)."""
    frl = ["strategy=frl", "client=frl", "model=supermask_mlp"]
    attack = ["attack.fraction=0.34"]  # 2 of the 6 tiny clients
    with pytest.raises(ConfigError, match="attack must be an attack on weights uploads"):
        preflight(tiny_cfg("attack=rank_reversal", *attack))
    with pytest.raises(ConfigError, match="attack must be an attack on rankings uploads"):
        preflight(tiny_cfg(*frl, "attack=scaling", *attack))
    with pytest.raises(ConfigError, match=r"strategy must be one of \['FedTrimmedAvg'"):
        preflight(tiny_cfg("attack=tailored", *attack))
    with pytest.raises(ConfigError, match=r"attack.fraction must be a number in \[0, 0.5\)"):
        validate(compose([*frl, "attack=rank_reversal", "attack.fraction=0.5"]))
    with pytest.raises(ConfigError, match="backend must be inprocess or ray under an attack"):
        preflight(tiny_cfg("attack=scaling", "backend=flower", *attack))
    preflight(tiny_cfg("attack=scaling", "attack.fraction=0.0", "backend=flower"))


def test_scaling_destroys_fedavg_and_a_trimmed_mean_survives_it(tiny_cfg):
    common = ["attack=scaling", "attack.fraction=0.2", "num_clients=10", "clients_per_round=5",
              "num_rounds=4", "dataset=digits", "client.lr=0.1", "client.momentum=0.9",
              "client.local_epochs=2"]
    fedavg = tiny_cfg(*common)
    run_experiment(fedavg)
    trimmed = tiny_cfg(*common, "strategy=fedtrimmedavg")
    run_experiment(trimmed)
    honest = tiny_cfg(*common, "attack.fraction=0")
    run_experiment(honest)
    accuracy = {name: read_metrics(cfg.output_dir)[-1]["server/accuracy"]
                for name, cfg in (("fedavg", fedavg), ("trimmed", trimmed), ("honest", honest))}
    loss = read_metrics(fedavg.output_dir)[-1]["server/loss"]
    assert loss is None or not math.isfinite(loss) or loss > 100  # the model is destroyed
    assert accuracy["fedavg"] < 0.2 < accuracy["honest"] - 0.2
    assert accuracy["trimmed"] > accuracy["honest"] - 0.15


def test_fedavg_destroyed_by_scaling_finishes_and_records_it(tmp_path):
    """The scaled update makes every later reply NaN: the run still goes to its last round
    (exit 0, a summary), records model_destroyed, and says so once."""
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", "from fedsim.cli import main; main()", "logger=none",
         "progress=false", "model=mlp", "dataset=digits", "num_clients=10",
         "clients_per_round=5", "evaluation.clients_per_round=2", "num_rounds=8",
         "client.lr=0.1", "client.momentum=0.9", "client.local_epochs=2", "attack=scaling",
         "attack.fraction=0.2", "faults.max_skipped_rounds=2", f"output_dir={out}"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = read_metrics(out)
    first = summary["model_destroyed_round"]
    assert summary["num_rounds"] == 8 and first < 8
    assert [bool(r.get("model_destroyed")) for r in rows] == [r["round"] >= first for r in rows]
    assert summary["skipped_rounds"] > 2  # more than faults.max_skipped_rounds in a row
    assert summary["final_server_accuracy"] < 0.2  # chance level, recorded
    text = done.stdout + done.stderr
    assert text.count("the global model is destroyed") == 1
    after = text.split("the global model is destroyed")[1]
    assert "failed (train)" not in after and "valid train replies" not in after


def test_tailored_attack_runs_against_multikrum(tiny_cfg):
    cfg = tiny_cfg("attack=tailored", "attack.fraction=0.2", "strategy=multikrum",
                   "strategy.num_malicious_nodes=1", "num_clients=10", "clients_per_round=5",
                   "num_rounds=2")
    run_experiment(cfg)
    assert read_metrics(cfg.output_dir)[-1]["train_failures"] == 0
