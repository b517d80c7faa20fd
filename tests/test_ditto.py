"""Ditto: the personal objective by hand, its two limits (lam 0 and large lam), and runs."""

import pytest
import torch
from conftest import read_metrics
from flwr.app import ConfigRecord, RecordDict

from fedsim.clients.ditto import PERSONAL, DittoTrainer, personal_objective
from fedsim.errors import ConfigError
from fedsim.experiment import run_experiment
from tests.helpers import tiny_arrays as initial
from tests.helpers import tiny_mlp as model_fn
from tests.test_trainer import blobs


def test_the_personal_gradient_by_hand():
    """v = (1, 2, 3), w = (0, 2, 5), lam = 0.5, F = 0: grad = lam (v - w) = (0.5, 0, -1);
    the loss is lam/2 ||v - w||^2 = 0.25 * (1 + 0 + 4) = 1.25."""
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    loss = personal_objective(torch.zeros(()), model, [torch.tensor([[0.0, 2.0, 5.0]])], 0.5)
    loss.backward()
    assert loss.item() == 1.25
    assert torch.equal(model.weight.grad, torch.tensor([[0.5, 0.0, -1.0]]))


def trainer(**kwargs) -> DittoTrainer:
    return DittoTrainer(model_fn, **{"seed": 0, "lr": 0.1, "momentum": 0.0, "local_epochs": 2,
                                     "device": "cpu", **kwargs})


def test_with_lam_zero_the_first_personal_model_is_the_local_update():
    """Same start (the received model), same batches, no penalty: the same path twice."""
    out = trainer(lam=0.0).train(initial(), ConfigRecord({"server-round": 1}), blobs(),
                                 RecordDict())
    personal = out.state[PERSONAL].to_torch_state_dict()
    for key, value in out.arrays.to_torch_state_dict().items():
        assert torch.equal(personal[key], value)


def test_a_large_lam_keeps_the_personal_model_at_the_global_one():
    """At lr * lam = 1 each personal step lands back on w, less one gradient step of F:
    the personal model stays within one step of w, the local update drifts over 16."""
    arrays = initial()
    out = trainer(lam=10.0).train(arrays, ConfigRecord({"server-round": 1}), blobs(),
                                  RecordDict())
    received = arrays.to_torch_state_dict()

    def drift(state: dict) -> float:
        return sum((state[k] - v).pow(2).sum().item() for k, v in received.items()) ** 0.5

    personal, uploaded = out.state[PERSONAL].to_torch_state_dict(), out.arrays.to_torch_state_dict()
    assert drift(personal) < 0.3 * drift(uploaded)


def test_the_personal_model_carries_over_and_is_what_is_scored():
    t = trainer()
    data, arrays = blobs(), initial()
    first = t.train(arrays, ConfigRecord({"server-round": 1}), data, RecordDict())
    second = t.train(arrays, ConfigRecord({"server-round": 2}), data, first.state)
    assert not (second.state[PERSONAL]["net.1.weight"].numpy()
                == first.state[PERSONAL]["net.1.weight"].numpy()).all()  # it went on
    scored = t.evaluate(arrays, ConfigRecord({}), data, second.state)
    fresh = t.evaluate(arrays, ConfigRecord({}), data, RecordDict())  # no personal model yet
    assert fresh["accuracy"] == fresh["global-accuracy"] == scored["global-accuracy"]
    assert scored["accuracy"] > scored["global-accuracy"]  # trained on this client's data


def test_a_ditto_run_reports_personal_and_global_local_accuracy(tiny_cfg):
    cfg = tiny_cfg("method=ditto", "num_rounds=3")
    run_experiment(cfg)
    last = read_metrics(cfg.output_dir)[-1]
    assert {"client_eval/mean-accuracy", "client_eval/mean-global-accuracy"} <= set(last)


@pytest.mark.parametrize("override", ["client.lam=-1", "client.personal_epochs=0"])
def test_bad_ditto_settings_are_refused_by_name(tiny_cfg, override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        run_experiment(tiny_cfg("method=ditto", override))
