"""FedPer, LG-FedAvg, FedBN and FedRep: which entries stay local, and that they do."""

import pytest
import torch
from conftest import read_metrics
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from fedsim.clients.personal import (
    PERSONAL_ENTRIES,
    FedRepTrainer,
    PersonalPartTrainer,
    personal_keys,
    personalized,
)
from fedsim.errors import ConfigError
from fedsim.experiment import run_experiment
from fedsim.models import MLP
from tests.helpers import PLAIN_SGD as SGD
from tests.helpers import tiny_arrays as initial
from tests.helpers import tiny_mlp as model_fn
from tests.test_trainer import blobs


def test_the_splits_by_hand():
    mlp = MLP([6], 3, hidden=[8])  # net: Flatten, Linear, ReLU, Linear
    assert personal_keys(mlp, "head") == {"net.3.weight", "net.3.bias"}
    assert personal_keys(mlp, "body") == {"net.1.weight", "net.1.bias"}
    assert personal_keys(mlp, "norm") == set()
    normed = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
    assert personal_keys(normed, "norm") == {"1.weight", "1.bias"}
    batch = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    assert personal_keys(batch, "norm") == {"1.weight", "1.bias", "1.running_mean",
                                            "1.running_var", "1.num_batches_tracked"}


def test_personalized_takes_the_client_s_own_entries():
    received = {"a": torch.zeros(2), "b": torch.ones(2)}
    own = {"b": torch.full((2,), 5.0)}
    got = personalized(received, own)
    assert torch.equal(got["a"], received["a"]) and torch.equal(got["b"], own["b"])
    assert personalized(received, None) == received


def test_fedper_scores_its_own_head_whatever_head_the_server_sends():
    trainer = PersonalPartTrainer(model_fn, personal="head", **SGD)
    data = blobs()
    out = trainer.train(initial(), ConfigRecord({"server-round": 1}), data, RecordDict())
    assert set(out.state[PERSONAL_ENTRIES].keys()) == {"net.3.weight", "net.3.bias"}
    global_state = out.arrays.to_torch_state_dict()
    scrambled = {k: (torch.zeros_like(v) if k.startswith("net.3") else v)
                 for k, v in global_state.items()}  # another head from the server
    a = trainer.test_logits(ArrayRecord(global_state), ConfigRecord({}), data, out.state)
    b = trainer.test_logits(ArrayRecord(scrambled), ConfigRecord({}), data, out.state)
    assert torch.equal(a, b)
    metrics = trainer.evaluate(ArrayRecord(scrambled), ConfigRecord({}), data, out.state)
    assert metrics["accuracy"] > metrics["global-accuracy"]  # a zero head guesses one class


def test_lg_fedavg_keeps_the_body_and_shares_the_head():
    trainer = PersonalPartTrainer(model_fn, personal="body", **SGD)
    out = trainer.train(initial(), ConfigRecord({"server-round": 1}), blobs(), RecordDict())
    assert set(out.state[PERSONAL_ENTRIES].keys()) == {"net.1.weight", "net.1.bias"}


def test_fedrep_trains_the_head_first_then_only_the_body():
    """The uploaded head is exactly the head trained alone for head_epochs: the body phase
    leaves it untouched (the same path, the same seed)."""
    data, arrays, config = blobs(), initial(), ConfigRecord({"server-round": 1})
    fedrep = FedRepTrainer(model_fn, head_epochs=2, **SGD)
    out = fedrep.train(arrays, config, data, RecordDict())
    reference = FedRepTrainer(model_fn, head_epochs=2, **SGD)
    model = reference.load_model(arrays)
    model.train()
    x, y = data.x_train, data.y_train
    head = list(model.net[3].parameters())
    reference.sgd_epochs(head, data, reference.round_settings(config),
                         lambda idx: reference.objective(model, x[idx], y[idx]), 2)
    uploaded = out.arrays.to_torch_state_dict()
    assert torch.equal(uploaded["net.3.weight"], model.net[3].weight.detach())
    assert not torch.equal(uploaded["net.1.weight"], arrays.to_torch_state_dict()["net.1.weight"])


@pytest.mark.parametrize("method", [["method=fedper"], ["method=lg_fedavg"],
                                    ["method=fedbn", "model=resmlp"],
                                    ["method=fedrep", "client.head_epochs=1"]])
def test_each_split_runs_and_reports_personal_and_global_accuracy(tiny_cfg, method):
    cfg = tiny_cfg(*method)
    run_experiment(cfg)
    last = read_metrics(cfg.output_dir)[-1]
    assert {"client_eval/mean-accuracy", "client_eval/mean-global-accuracy"} <= set(last)


def test_fedbn_needs_normalization_layers(tiny_cfg):
    with pytest.raises(ConfigError, match="client.personal"):
        run_experiment(tiny_cfg("method=fedbn", "model=mlp"))


@pytest.mark.parametrize("override", ["client.personal=all", "client.head_epochs=0"])
def test_bad_settings_are_refused_by_name(tiny_cfg, override):
    method = "method=fedrep" if "head_epochs" in override else "method=fedper"
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        run_experiment(tiny_cfg(method, override))
