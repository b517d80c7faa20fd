"""pFedMe: the inner and outer steps by hand, the personalized model scored, a run."""

import pytest
import torch
from conftest import read_metrics
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim.clients.pfedme import PERSONALIZED, PFedMeTrainer, moreau_step, pull_toward
from fedsim.errors import ConfigError
from fedsim.experiment import run_experiment
from tests.helpers import tiny_mlp as model_fn
from tests.test_trainer import blobs


def test_the_two_steps_by_hand():
    """theta = 2, w = 1, grad f = 0.5, lam = 2, lr 0.1: theta - 0.1 (0.5 + 2 (2 - 1)) =
    2 - 0.25 = 1.75; then w <- 1 - 0.1 * 2 * (1 - 1.75) = 1.15."""
    theta = moreau_step({"p": torch.tensor(2.0)}, {"p": torch.tensor(1.0)},
                        {"p": torch.tensor(0.5)}, lam=2.0, lr=0.1)
    assert theta["p"].item() == pytest.approx(1.75)
    w = pull_toward({"p": torch.tensor(1.0)}, theta, lam=2.0, lr=0.1)
    assert w["p"].item() == pytest.approx(1.15)


def test_the_personalized_model_is_kept_and_scored():
    torch.manual_seed(0)
    arrays, data = ArrayRecord(model_fn().state_dict()), blobs()
    trainer = PFedMeTrainer(model_fn, seed=0, lr=0.05, personal_lr=0.05, personal_steps=2,
                            local_epochs=1, device="cpu")
    out = trainer.train(arrays, ConfigRecord({"server-round": 1}), data, RecordDict())
    theta = out.state[PERSONALIZED].to_torch_state_dict()
    w = out.arrays.to_torch_state_dict()
    assert not torch.equal(theta["net.1.weight"], w["net.1.weight"])
    scored = trainer.evaluate(out.arrays, ConfigRecord({}), data, out.state)
    fresh = trainer.evaluate(out.arrays, ConfigRecord({}), data, RecordDict())
    assert fresh["accuracy"] == fresh["global-accuracy"] == scored["global-accuracy"]
    assert scored["loss"] != scored["global-loss"]  # theta, not w (30 samples: accuracies may tie)


def test_a_pfedme_run_trains(tiny_cfg):
    cfg = tiny_cfg("method=pfedme", "client.lr=0.05", "client.personal_lr=0.05",
                   "client.personal_steps=2", "num_rounds=3")
    run_experiment(cfg)
    rows = read_metrics(cfg.output_dir)
    assert rows[-1]["server/accuracy"] > rows[0]["server/accuracy"]
    assert "client_eval/mean-global-accuracy" in rows[-1]


@pytest.mark.parametrize("override", ["client.lam=-1", "client.personal_steps=0"])
def test_bad_pfedme_settings_are_refused_by_name(tiny_cfg, override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        run_experiment(tiny_cfg("method=pfedme", override))
