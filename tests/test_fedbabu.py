"""FedBABU: the head never trains in federated rounds, fine-tuning happens at evaluation."""

import pytest
import torch
from conftest import read_metrics
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim.clients.fedbabu import FedBABUTrainer, body_parameters
from fedsim.errors import ConfigError
from fedsim.experiment import run_experiment
from tests.helpers import PLAIN_SGD as SGD
from tests.helpers import tiny_mlp as model_fn
from tests.test_trainer import blobs


def test_the_body_is_everything_but_the_classifier():
    model = model_fn()
    assert [p.shape for p in body_parameters(model)] == [(8, 6), (8,)]


def test_training_leaves_the_head_at_its_initialization():
    torch.manual_seed(0)
    arrays = ArrayRecord(model_fn().state_dict())
    out = FedBABUTrainer(model_fn, **SGD).train(arrays, ConfigRecord({"server-round": 1}),
                                                blobs(), RecordDict())
    before, after = arrays.to_torch_state_dict(), out.arrays.to_torch_state_dict()
    assert torch.equal(after["net.3.weight"], before["net.3.weight"])
    assert not torch.equal(after["net.1.weight"], before["net.1.weight"])


def test_evaluation_fine_tunes_a_copy_and_reports_the_received_model_too():
    torch.manual_seed(0)
    arrays, data = ArrayRecord(model_fn().state_dict()), blobs()
    trainer = FedBABUTrainer(model_fn, finetune_epochs=3, **SGD)
    metrics = trainer.evaluate(arrays, ConfigRecord({}), data, RecordDict())
    assert metrics["accuracy"] > metrics["global-accuracy"]  # tuned on the client's data
    untuned = FedBABUTrainer(model_fn, finetune_epochs=0, **SGD).evaluate(
        arrays, ConfigRecord({}), data, RecordDict())
    assert untuned["accuracy"] == untuned["global-accuracy"] == metrics["global-accuracy"]
    for key, value in trainer._model.state_dict().items():  # the copy trained, not the model
        assert torch.equal(value, arrays.to_torch_state_dict()[key])


def test_a_fedbabu_run_reports_both_accuracies(tiny_cfg):
    cfg = tiny_cfg("method=fedbabu", "client.finetune_epochs=1", "num_rounds=2")
    run_experiment(cfg)
    last = read_metrics(cfg.output_dir)[-1]
    assert {"client_eval/mean-accuracy", "client_eval/mean-global-accuracy"} <= set(last)


def test_bad_finetune_epochs_are_refused_by_name(tiny_cfg):
    with pytest.raises(ConfigError, match="client.finetune_epochs"):
        run_experiment(tiny_cfg("method=fedbabu", "client.finetune_epochs=-1"))
