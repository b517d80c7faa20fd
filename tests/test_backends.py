"""The same config and seed give the same run on every backend."""

import logging

import pytest
from conftest import read_metrics, without_timing

from fedsim.experiment import run_experiment

pytestmark = pytest.mark.long_running(seconds=240)  # started first: conftest.py


@pytest.fixture(scope="module")
def ray_session():
    from pathlib import Path

    import ray

    tests_dir = str(Path(__file__).parent)  # so workers can import `helpers`
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             configure_logging=False, runtime_env={"env_vars": {"PYTHONPATH": tests_dir}})
    yield
    ray.shutdown()


@pytest.mark.parametrize("method", [
    [],
    ["strategy=fedld", "client=fedld"],
    ["strategy=frl", "client=frl", "model=supermask_mlp", "attack=rank_reversal",
     "attack.fraction=0.25", "attack.colluders=2"],
    ["strategy=fedloge", "client=fedloge", "client.etf_steps=100",
     "data.imbalance_factor=0.1"],
    ["strategy=fedbuff", "strategy.concurrency=4", "strategy.buffer_size=2", "devices=fixed",
     "devices.delay=2", "devices.fraction=0.5"],
    ["faults.crash_prob=0.25", "faults.nan_prob=0.25", "faults.min_replies=2"],
], ids=["fedavg", "fedld-deltas", "frl-rankings-under-attack", "fedloge-local-heads",
        "fedbuff-virtual-clock", "injected-faults"])
def test_ray_backend_matches_inprocess_exactly(tiny_cfg, ray_session, method):
    overrides = ["partition=dirichlet", "num_rounds=3", "num_clients=8", "clients_per_round=3",
                 "evaluation.clients_per_round=3", *method]
    local, remote = tiny_cfg(*overrides), tiny_cfg(*overrides, "backend=ray")
    run_experiment(local)
    run_experiment(remote)
    a, b = read_metrics(local.output_dir), read_metrics(remote.output_dir)
    assert without_timing(a) == without_timing(b)
    assert len(a) == 4 and "client_eval/accuracy" in a[-1]


def test_a_killed_ray_worker_costs_its_replies_and_the_run_goes_on(tiny_cfg, ray_session,
                                                                    caplog):
    cfg = tiny_cfg("backend=ray", "backend.num_actors=2", "num_rounds=4", "clients_per_round=4",
                   "faults.kill_worker_round=2")
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        run_experiment(cfg)
    failures = [r["train_failures"] for r in read_metrics(cfg.output_dir)[1:]]
    assert failures[0] == failures[2] == failures[3] == 0
    assert failures[1] >= 1  # the dead worker's clients; the others replied
    assert "failed (train): Ray worker failed" in caplog.text
    assert rows_have_training(cfg.output_dir, rounds=(2, 3, 4))


def rows_have_training(run_dir, rounds) -> bool:
    rows = read_metrics(run_dir)
    return all("train/train_loss" in rows[r] for r in rounds)


def test_a_ray_client_past_the_deadline_is_dropped_and_its_worker_restarted(
        tiny_cfg, ray_session, caplog):
    from fedsim.fault_injection import draw_faults

    cfg = tiny_cfg("backend=ray", "backend.num_actors=2", "num_rounds=3",
                   "faults.hang_prob=0.2", "faults.hang_s=4", "faults.timeout_s=2.5")
    hung = [r for r in range(1, 4) for p in range(cfg.num_clients)
            if draw_faults(cfg.faults, cfg.seed, p, r).hang_s]
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        summary = run_experiment(cfg)
    assert hung and summary["train_failures"] >= 1
    assert "sent no train reply before the round's deadline" in caplog.text
    assert summary["final_server_accuracy"] is not None


def test_a_run_interrupted_in_process_resumes_on_ray_to_the_same_end(tiny_cfg, ray_session,
                                                                     monkeypatch):
    from test_reliability import _interrupted_run

    from fedsim import checkpoint

    run = ["num_rounds=5", "checkpoint.every=2", "strategy=fedld", "client=fedld",
           "faults.crash_prob=0.2"]
    whole, broken = tiny_cfg(*run), tiny_cfg(*run)
    run_experiment(whole)
    _interrupted_run(broken, stop_round=4, monkeypatch=monkeypatch)
    run_experiment(checkpoint.resumed_config(broken.output_dir,
                                             ["backend=ray", "backend.num_actors=2"]))
    assert without_timing(read_metrics(broken.output_dir)) == \
        without_timing(read_metrics(whole.output_dir))


def test_ray_backend_keeps_client_state_across_rounds(tiny_cfg, ray_session):
    """Node contexts travel with their messages, whichever actor serves them."""
    cfg = tiny_cfg("backend=ray", "backend.num_actors=2", "num_clients=2", "clients_per_round=2",
                   "num_rounds=3", "evaluation.clients_per_round=2",
                   "client._target_=helpers.RankingTrainer",
                   "strategy._target_=helpers.DtypeRecordingFedAvg")
    run_experiment(cfg)
    rows = read_metrics(cfg.output_dir)
    assert [r["train/rounds_seen"] for r in rows[1:]] == [1.0, 2.0, 3.0]
    # evaluation visits the nodes in another order, so each node's state has moved actors
    assert [r["client_eval/local_rounds"] for r in rows[1:]] == [1.0, 2.0, 3.0]


def test_flower_engine_backend_matches_with_full_participation(tiny_cfg, ray_session):
    overrides = ["num_clients=3", "clients_per_round=3", "evaluation.clients_per_round=3"]
    local, flower = tiny_cfg(*overrides), tiny_cfg(*overrides, "backend=flower")
    run_experiment(local)
    run_experiment(flower)
    for a, b in zip(read_metrics(local.output_dir), read_metrics(flower.output_dir),
                    strict=True):
        # Flower's engine hands replies over in arrival order, so FedAvg's float32 sum of 3
        # clients may associate differently: losses agree to a few ulps, and one test sample
        # at a near-tie may flip its prediction.
        for key in ("server/loss", "train/train_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), key
        if "server/accuracy" in a:
            assert b["server/accuracy"] == pytest.approx(a["server/accuracy"], abs=1.5e-3)


def test_a_pool_the_cluster_cannot_place_is_refused(tiny_cfg, ray_session):
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match="backend.num_cpus"):
        run_experiment(tiny_cfg("backend=ray", "backend.num_actors=4"))
    with pytest.raises(ConfigError, match="backend.num_gpus"):
        run_experiment(tiny_cfg("backend=ray", "backend.num_gpus=1"))
