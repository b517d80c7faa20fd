import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_metrics, without_timing
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedsim.backends.base import MeteredGrid, content_nbytes
from fedsim.backends.inprocess import InProcessGrid
from fedsim.clients.base import round_seed
from fedsim.datasets.federated import build_federated_data
from fedsim.errors import ConfigError
from fedsim.experiment import run_experiment
from fedsim.runtime import initial_model


def test_default_backend_writes_metrics_summary_and_plots(tiny_cfg):
    cfg = tiny_cfg("plots.enabled=true")  # the default; tiny_cfg turns plots off
    summary = run_experiment(cfg)
    run_dir = Path(cfg.output_dir)
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    last = rows[-1]
    for key in ("train/train_loss", "server/accuracy", "server/loss", "client_eval/accuracy",
                "wall_time_s", "bytes_up", "bytes_down"):
        assert key in last, key
    assert last["bytes_down"] > 0 and last["bytes_up"] > 0
    assert summary["final_server_accuracy"] == last["server/accuracy"]
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "plots" / "curves.png").stat().st_size > 0
    assert (run_dir / "plots" / "label_distribution.png").stat().st_size > 0


def test_plots_enabled_false_writes_no_plots_folder(tiny_cfg):
    cfg = tiny_cfg("plots.enabled=false", "plots.metrics=[server/loss]")
    run_experiment(cfg)
    run_dir = Path(cfg.output_dir)
    assert (run_dir / "summary.json").exists() and not (run_dir / "plots").exists()


def test_a_finished_run_is_never_overwritten(tiny_cfg):
    cfg = tiny_cfg()
    run_experiment(cfg)
    before = (Path(cfg.output_dir) / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        run_experiment(cfg)
    assert (Path(cfg.output_dir) / "metrics.jsonl").read_text() == before


def test_training_improves_accuracy_on_mnist1d(tiny_cfg):
    cfg = tiny_cfg("num_rounds=15", "client.local_epochs=2", "evaluation.clients_per_round=0")
    rows = read_metrics(run_experiment(cfg) and cfg.output_dir)
    assert rows[-1]["server/accuracy"] > rows[0]["server/accuracy"] + 0.1


def test_server_evaluation_period(tiny_cfg):
    cfg = tiny_cfg("num_rounds=5", "evaluation.server_every=2")
    run_experiment(cfg)
    evaluated = [r["round"] for r in read_metrics(cfg.output_dir) if "server/accuracy" in r]
    assert evaluated == [0, 2, 4, 5]


def test_same_seed_same_metrics_and_another_seed_differs(tiny_cfg):
    runs = []
    for seed in (0, 0, 1):
        cfg = tiny_cfg(f"seed={seed}", "partition=dirichlet")
        run_experiment(cfg)
        runs.append(without_timing(read_metrics(cfg.output_dir)))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [
        ("fedavg", []), ("fedprox", []), ("fedadam", []), ("fedyogi", []),
        ("fedadagrad", []), ("fedavgm", []), ("fedmedian", []), ("fedtrimmedavg", []),
        ("krum", []), ("multikrum", ["strategy.num_nodes_to_select=2"]),
        ("bulyan", ["num_clients=8", "clients_per_round=7"]),
    ],
)
def test_every_flower_strategy_runs_by_name(tiny_cfg, strategy, extra):
    cfg = tiny_cfg(f"strategy={strategy}", "evaluation.clients_per_round=0", *extra)
    summary = run_experiment(cfg)
    assert 0.0 <= summary["final_server_accuracy"] <= 1.0
    assert summary["strategy"].lower() == strategy


def test_interface_carries_integer_uploads_state_and_personal_metrics(tiny_cfg):
    from helpers import DtypeRecordingFedAvg

    DtypeRecordingFedAvg.seen_dtypes.clear()
    cfg = tiny_cfg("num_clients=2", "clients_per_round=2", "num_rounds=3",
                   "evaluation.clients_per_round=2", "client._target_=helpers.RankingTrainer",
                   "strategy._target_=helpers.DtypeRecordingFedAvg")
    run_experiment(cfg)
    rows = read_metrics(cfg.output_dir)
    assert set(DtypeRecordingFedAvg.seen_dtypes) == {"int32"}
    assert [r["train/rounds_seen"] for r in rows[1:]] == [1.0, 2.0, 3.0]
    assert [r["client_eval/local_rounds"] for r in rows[1:]] == [1.0, 2.0, 3.0]


def test_centralized_run_equals_a_plain_training_loop(tiny_cfg):
    """num_clients=1 through the same trainer and FedAvg == a plain PyTorch loop."""
    cfg = tiny_cfg("num_clients=1", "clients_per_round=1", "num_rounds=3",
                   "evaluation.clients_per_round=0", "client.momentum=0.9",
                   "client.batch_size=64")
    run_experiment(cfg)
    fedsim_rows = read_metrics(cfg.output_dir)

    data = build_federated_data(cfg)
    client = data.client(0)  # all training samples
    assert client.num_train == len(data.splits.y_train)
    model = initial_model(cfg, data)
    x_test, y_test = data.server_test()
    for rnd in range(1, 4):
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.client.lr, momentum=0.9)
        shuffle = torch.Generator().manual_seed(round_seed(cfg.seed, 0, rnd))
        order = torch.randperm(client.num_train, generator=shuffle)
        for idx in order.split(64):
            loss = torch.nn.functional.cross_entropy(model(client.x_train[idx]),
                                                     client.y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            logits = model(x_test)
        accuracy = (logits.argmax(1) == y_test).sum().item() / len(y_test)
        loss = torch.nn.functional.cross_entropy(logits, y_test).item()
        # The server evaluates in batches, the loop in one call: the logits may differ in the
        # last float32 bit, so one sample at a near-tie may flip its prediction.
        assert fedsim_rows[rnd]["server/accuracy"] == pytest.approx(accuracy, abs=1 / len(y_test))
        assert fedsim_rows[rnd]["server/loss"] == pytest.approx(loss, rel=1e-5)


class ShuffledGrid(InProcessGrid):
    """Lists its nodes out of order, as a SuperLink may."""

    def get_node_ids(self):
        return [3, 1, 2]


def test_metered_grid_counts_payload_bytes_and_sorts_nodes(tiny_cfg):
    from fedsim.client_app import app
    from fedsim.config import from_run_config, to_run_config

    cfg = tiny_cfg()
    run_config = to_run_config(cfg)
    grid = MeteredGrid(ShuffledGrid(app, cfg.num_clients, run_config))
    assert list(grid.get_node_ids()) == [1, 2, 3]
    data = build_federated_data(from_run_config(run_config))
    arrays = ArrayRecord(initial_model(cfg, data).state_dict())
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    replies = grid.send_and_receive([Message(content, dst_node_id=2, message_type="train")])
    counts = grid.take_counts()
    assert counts["bytes_down"] == content_nbytes(content) == sum(
        len(a.data) for a in arrays.values()
    )
    assert counts["bytes_up"] == content_nbytes(replies[0].content) > 0
    assert counts["train_failures"] == 0
    assert grid.take_counts()["bytes_down"] == 0  # taken counts start again


def test_a_failing_client_becomes_an_error_reply(tiny_cfg):
    from fedsim.client_app import app
    from fedsim.config import to_run_config

    cfg = tiny_cfg()
    grid = InProcessGrid(app, cfg.num_clients, to_run_config(cfg))
    content = RecordDict({"arrays": ArrayRecord({"wrong": Array(np.zeros(3))}),
                          "config": ConfigRecord({"server-round": 1})})
    (reply,) = grid.send_and_receive([Message(content, dst_node_id=1, message_type="train")])
    assert reply.has_error()
    assert "the server's arrays do not fit this client's model (MLP): missing keys ['net." \
        in reply.error.reason and "unexpected keys ['wrong']" in reply.error.reason


def test_summary_is_valid_json_with_the_run_identity(tiny_cfg):
    cfg = tiny_cfg("strategy=fedprox")
    run_experiment(cfg)
    summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    assert summary["strategy"] == "FedProx" and summary["seed"] == 0



def test_failing_clients_are_reported_and_the_run_goes_on(tiny_cfg):
    cfg = tiny_cfg("client._target_=helpers.FailingTrainer", "evaluation.clients_per_round=0")
    summary = run_experiment(cfg)
    rows = read_metrics(cfg.output_dir)
    assert len(rows) == 3 and not any("train/train_loss" in r for r in rows)
    assert [r["train_failures"] for r in rows[1:]] == [3, 3]
    assert summary["train_failures"] == 6
    assert summary["final_server_accuracy"] == rows[0]["server/accuracy"]  # model unchanged


def test_a_server_failure_stops_the_run_and_leaves_no_summary(tiny_cfg):
    cfg = tiny_cfg("strategy._target_=helpers.FedAvgFailingInRound2")
    with pytest.raises(RuntimeError, match="aggregation broke"):
        run_experiment(cfg)
    run_dir = Path(cfg.output_dir)
    assert [r["round"] for r in read_metrics(run_dir)] == [0, 1]
    assert not (run_dir / "summary.json").exists()


def test_node_state_exists_only_for_clients_that_took_part(tiny_cfg):
    """A large registered population costs nothing until a client is sampled."""
    from fedsim.client_app import app
    from fedsim.config import to_run_config

    grid = InProcessGrid(app, 10_000, to_run_config(tiny_cfg()))
    assert len(list(grid.get_node_ids())) == 10_000
    assert grid.contexts == {}
    grid.context(17)
    assert list(grid.contexts) == [17]
    assert grid.contexts[17].node_config["partition-id"] == 16


def test_clients_without_test_samples_do_not_break_federated_evaluation(tiny_cfg, tmp_path):
    """Test pool without classes 2 and 3: some clients get empty test splits."""
    rng = np.random.default_rng(0)
    path = tmp_path / "skewed.npz"
    np.savez(path, x_train=rng.normal(size=(120, 4)), y_train=np.repeat(np.arange(4), 30),
             x_test=rng.normal(size=(40, 4)), y_test=np.repeat([0, 1], 20))
    cfg = tiny_cfg("dataset=npz", f"dataset.path={path}", "partition=pathological",
                   "partition.num_classes_per_partition=1", "num_clients=4",
                   "clients_per_round=4", "evaluation.clients_per_round=4")
    run_experiment(cfg)
    for row in read_metrics(cfg.output_dir)[1:]:
        assert 0.0 <= row["client_eval/accuracy"] <= 1.0


def test_dirichlet_accepts_one_alpha_per_client(tiny_cfg):
    cfg = tiny_cfg("partition=dirichlet", "partition.alpha=[0.1,0.1,0.1,10,10,10]")
    assert run_experiment(cfg)["final_server_accuracy"] is not None


def test_global_torch_rng_draws_in_a_client_do_not_depend_on_the_process_state(tiny_cfg):
    from fedsim.client_app import app
    from fedsim.config import from_run_config, to_run_config

    cfg = tiny_cfg("client._target_=helpers.NoisyTrainer")
    run_config = to_run_config(cfg)
    data = build_federated_data(from_run_config(run_config))
    arrays = ArrayRecord(initial_model(cfg, data).state_dict())
    noise = []
    for outside_seed in (1, 2):
        torch.manual_seed(outside_seed)
        grid = InProcessGrid(app, cfg.num_clients, run_config)
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
        (reply,) = grid.send_and_receive([Message(content, dst_node_id=2, message_type="train")])
        noise.append(reply.content["metrics"]["noise"])
    assert noise[0] == noise[1]
    assert torch.rand(()).item() != noise[0]  # the caller's RNG stream was left alone


def test_a_method_from_outside_fedsim_declares_its_cross_group_check(tiny_cfg):
    """`check(spec)` on a class selected by `_target_` runs in preflight, before any work,
    with no engine edit; the CLI turns its ConfigError into the one-line message."""
    refused = tiny_cfg("strategy._target_=helpers.LinearOnlyFedAvg", "model=cnn1d")
    with pytest.raises(ConfigError, match=r"model: helpers.LinearOnlyFedAvg needs linear"):
        run_experiment(refused)
    assert not Path(refused.output_dir).exists()
    accepted = tiny_cfg("strategy._target_=helpers.LinearOnlyFedAvg", "num_rounds=1")
    assert run_experiment(accepted)["final_server_accuracy"] is not None


def test_a_strategy_constructor_refusal_is_one_line_before_any_work(tiny_cfg):
    cfg = tiny_cfg("strategy._target_=helpers.ThresholdFedAvg", "+strategy.threshold=-1")
    with pytest.raises(ConfigError, match=r"^strategy \(helpers.ThresholdFedAvg\) refuses its "
                                          r"settings: threshold must be > 0 \(got -1\)$"):
        run_experiment(cfg)
    assert not Path(cfg.output_dir).exists()


def test_a_simulated_run_checks_its_config_once(tiny_cfg, monkeypatch):
    from fedsim import runtime

    calls = []
    real = runtime.preflight
    monkeypatch.setattr(runtime, "preflight", lambda cfg: calls.append(1) or real(cfg))
    run_experiment(tiny_cfg("num_rounds=1"))
    assert len(calls) == 1


def test_a_strategy_with_its_own_round_loop_is_refused_before_any_work(tiny_cfg):
    cfg = tiny_cfg("strategy._target_=helpers.OwnLoopFedAvg")
    with pytest.raises(ConfigError, match="strategy: OwnLoopFedAvg overrides Strategy.start"):
        run_experiment(cfg)
    assert not Path(cfg.output_dir).exists()
