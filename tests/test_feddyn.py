"""FedDyn: the server and client updates by hand, FedProx as its first round, runs."""

import numpy as np
import pytest
import torch
from conftest import read_metrics
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim.clients.feddyn import GRADIENT_STATE, FedDynTrainer, updated_gradient
from fedsim.clients.sgd import SGDTrainer
from fedsim.errors import ConfigError, MessageError
from fedsim.experiment import run_experiment
from fedsim.strategies.feddyn import ALPHA, server_update
from tests.helpers import PLAIN_SGD as SGD
from tests.helpers import tiny_mlp as model_fn
from tests.test_trainer import blobs


def test_server_update_by_hand():
    """x = (1, 1), h = 0, alpha = 0.5, N = 4; y_1 = (3, 1), y_2 = (1, 1):
    sum (y_i - x) = (2, 0), h = 0 - 0.5/4 * (2, 0) = (-0.25, 0); mean y = (2, 1);
    x' = (2, 1) - h / 0.5 = (2.5, 1)."""
    x, h = {"w": np.array([1.0, 1.0])}, {"w": np.zeros(2)}
    ys = [{"w": np.array([3.0, 1.0])}, {"w": np.array([1.0, 1.0])}]
    new_x, new_h = server_update(x, h, ys, alpha=0.5, num_clients=4)
    assert np.allclose(new_h["w"], [-0.25, 0]) and np.allclose(new_x["w"], [2.5, 1])


def test_client_gradient_state_by_hand():
    """g = 0, y = (3, 1), x = (1, 1), alpha 0.5: g' = -0.5 * (2, 0) = (-1, 0)."""
    got = updated_gradient(torch.zeros(2), torch.tensor([3.0, 1.0]), torch.ones(2), 0.5)
    assert torch.equal(got, torch.tensor([-1.0, 0.0]))


def test_the_first_round_is_fedprox_with_mu_alpha():
    """With g_i = 0 the linear term is exactly zero: FedProx's loss at mu = alpha."""
    torch.manual_seed(0)
    arrays, data = ArrayRecord(model_fn().state_dict()), blobs()
    config = ConfigRecord({"server-round": 1, ALPHA: 0.3})
    dyn = FedDynTrainer(model_fn, **SGD).train(arrays, config, data, RecordDict())
    prox = SGDTrainer(model_fn, proximal_mu=0.3, **SGD).train(
        arrays, ConfigRecord({"server-round": 1}), data, RecordDict())
    for key, value in prox.arrays.to_torch_state_dict().items():
        assert torch.equal(dyn.arrays.to_torch_state_dict()[key], value)
    assert set(dyn.state[GRADIENT_STATE].keys()) == {"net.1.weight", "net.1.bias",
                                                      "net.3.weight", "net.3.bias"}


def test_a_client_without_alpha_from_the_server_refuses():
    torch.manual_seed(0)
    with pytest.raises(MessageError, match=ALPHA):
        FedDynTrainer(model_fn, **SGD).train(ArrayRecord(model_fn().state_dict()),
                                             ConfigRecord({"server-round": 1}), blobs(),
                                             RecordDict())


def test_a_feddyn_run_trains(tiny_cfg):
    cfg = tiny_cfg("method=feddyn", "num_rounds=3")
    run_experiment(cfg)
    rows = read_metrics(cfg.output_dir)
    assert rows[-1]["server/accuracy"] > rows[0]["server/accuracy"]
    assert rows[-1]["train/h-norm"] > 0


def test_a_bad_alpha_is_refused_by_name(tiny_cfg):
    with pytest.raises(ConfigError, match="strategy.alpha"):
        run_experiment(tiny_cfg("method=feddyn", "strategy.alpha=0"))
