"""Per-FedAvg (FO): one meta-step by hand, personalization at evaluation, a run."""

import pytest
import torch
from conftest import read_metrics
from flwr.app import ConfigRecord, RecordDict

from fedsim.clients.perfedavg import PerFedAvgTrainer, first_order_step
from fedsim.errors import ConfigError
from fedsim.experiment import run_experiment
from tests.helpers import tiny_arrays as initial
from tests.helpers import tiny_mlp as model_fn
from tests.test_trainer import blobs


def test_a_first_order_meta_step_by_hand():
    """f(theta) = theta^2 / 2 on both batches (grad = theta). theta = 2, alpha = 0.5:
    theta' = 2 - 0.5 * 2 = 1; the outer gradient is taken at theta' (= 1), so with
    beta = 0.1, theta <- 2 - 0.1 * 1 = 1.9 (plain SGD would give 2 - 0.1 * 2 = 1.8)."""
    params = {"t": torch.tensor(2.0)}
    got = first_order_step(params, {"t": torch.tensor(2.0)}, lambda at: {"t": at["t"]},
                           alpha=0.5, beta=0.1)
    assert got["t"].item() == pytest.approx(1.9)


def test_training_moves_the_model_and_evaluation_personalizes_a_copy():
    trainer = PerFedAvgTrainer(model_fn, seed=0, lr=0.05, inner_lr=0.1, eval_steps=3,
                               momentum=0.0, local_epochs=2, batch_size=16, device="cpu")
    data, arrays = blobs(), initial()
    out = trainer.train(arrays, ConfigRecord({"server-round": 1}), data, RecordDict())
    assert out.metrics["meta-steps"] == 2 * (8 // 2)  # 8 batches of 16 a epoch, in pairs
    assert not torch.equal(out.arrays.to_torch_state_dict()["net.1.weight"],
                           arrays.to_torch_state_dict()["net.1.weight"])
    metrics = trainer.evaluate(out.arrays, ConfigRecord({}), data, RecordDict())
    assert metrics["accuracy"] != metrics["global-accuracy"]
    frozen = PerFedAvgTrainer(model_fn, eval_steps=0, device="cpu").evaluate(
        out.arrays, ConfigRecord({}), data, RecordDict())
    assert frozen["accuracy"] == frozen["global-accuracy"] == metrics["global-accuracy"]


def test_a_perfedavg_run_trains(tiny_cfg):
    cfg = tiny_cfg("method=perfedavg", "client.lr=0.05", "num_rounds=3")
    run_experiment(cfg)
    rows = read_metrics(cfg.output_dir)
    assert rows[-1]["server/accuracy"] > rows[0]["server/accuracy"]
    assert "client_eval/mean-global-accuracy" in rows[-1]


@pytest.mark.parametrize("override", ["client.inner_lr=-1", "client.eval_steps=-1"])
def test_bad_perfedavg_settings_are_refused_by_name(tiny_cfg, override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        run_experiment(tiny_cfg("method=perfedavg", override))
