"""MOON: the contrastive loss by hand, its reduction at mu = 0, and a run that resumes."""

import math

import pytest
import torch
from conftest import read_metrics
from flwr.app import ConfigRecord, RecordDict

from fedsim.clients.moon import PREVIOUS, MoonTrainer, model_contrastive_loss
from fedsim.clients.sgd import SGDTrainer
from fedsim.errors import ConfigError
from fedsim.experiment import run_experiment
from tests.helpers import PLAIN_SGD as SGD
from tests.helpers import tiny_arrays as initial
from tests.helpers import tiny_mlp as model_fn
from tests.test_trainer import blobs


def test_the_contrastive_loss_by_hand():
    """z = z_glob = (1, 0), z_prev = (0, 1): sims 1 and 0, over tau 0.5: 2 and 0;
    l_con = -log(e^2 / (e^2 + e^0)) = log(1 + e^-2). Swapping the two gives log(1 + e^2)."""
    z = torch.tensor([[1.0, 0.0]])
    near, far = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0]])  # cosine ignores length
    assert model_contrastive_loss(z, near, far, 0.5).item() == pytest.approx(
        math.log1p(math.exp(-2)))
    assert model_contrastive_loss(z, far, near, 0.5).item() == pytest.approx(
        math.log1p(math.exp(2)))


def test_mu_zero_is_plain_sgd_and_the_previous_model_is_kept():
    data, config = blobs(), ConfigRecord({"server-round": 1})
    moon = MoonTrainer(model_fn, mu=0.0, **SGD).train(initial(), config, data, RecordDict())
    plain = SGDTrainer(model_fn, **SGD).train(initial(), config, data, RecordDict())
    for key, value in plain.arrays.to_torch_state_dict().items():
        assert torch.equal(moon.arrays.to_torch_state_dict()[key], value)  # the same path
    assert moon.state[PREVIOUS] is moon.arrays


def test_the_contrastive_term_changes_training_once_the_models_differ():
    data, arrays = blobs(), initial()
    trainer = MoonTrainer(model_fn, mu=5.0, **SGD)
    first = trainer.train(arrays, ConfigRecord({"server-round": 1}), data, RecordDict())
    plain = MoonTrainer(model_fn, mu=0.0, **SGD).train(
        arrays, ConfigRecord({"server-round": 2}), data, first.state)
    moon = trainer.train(arrays, ConfigRecord({"server-round": 2}), data, first.state)
    assert not (moon.arrays["net.1.weight"].numpy()
                == plain.arrays["net.1.weight"].numpy()).all()


def test_a_moon_run_trains(tiny_cfg):
    cfg = tiny_cfg("method=moon", "num_rounds=3")
    run_experiment(cfg)
    rows = read_metrics(cfg.output_dir)
    assert rows[-1]["server/accuracy"] > rows[0]["server/accuracy"]


@pytest.mark.parametrize("override", ["client.mu=-1", "client.temperature=0"])
def test_bad_moon_settings_are_refused_by_name(tiny_cfg, override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        run_experiment(tiny_cfg("method=moon", override))
