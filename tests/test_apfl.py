"""APFL: the mixture and alpha's gradient by hand, its limits, and a run that resumes."""

import pytest
import torch
from conftest import read_metrics
from flwr.app import ConfigRecord, RecordDict

from fedsim.clients.apfl import LOCAL, MIXING, APFLTrainer, alpha_gradient, mixture
from fedsim.clients.sgd import SGDTrainer
from fedsim.errors import ConfigError
from fedsim.experiment import run_experiment
from tests.helpers import PLAIN_SGD as SGD
from tests.helpers import tiny_arrays as initial
from tests.helpers import tiny_mlp as model_fn
from tests.test_trainer import blobs


def test_the_mixture_by_hand():
    """v = (1, 3), w = (3, 1), alpha = 0.25: (0.25 + 2.25, 0.75 + 0.75) = (2.5, 1.5)."""
    got = mixture({"p": torch.tensor([1.0, 3.0])}, {"p": torch.tensor([3.0, 1.0])}, 0.25)
    assert torch.equal(got["p"], torch.tensor([2.5, 1.5]))


def test_alpha_s_gradient_is_the_inner_product_with_v_minus_w():
    """f(v_bar) = sum(v_bar^2)/2 has grad v_bar; at alpha 0.5, v = (2, 0), w = (0, 2):
    v_bar = (1, 1), d f / d alpha = <v - w, v_bar> = 2 - 2 = 0; at v = (4, 0): v_bar =
    (2, 1), <(4, -2), (2, 1)> = 6."""
    w = {"p": torch.tensor([0.0, 2.0])}
    for v_value, expected in (([2.0, 0.0], 0.0), ([4.0, 0.0], 6.0)):
        v = {"p": torch.tensor(v_value)}
        a = torch.tensor(0.5, requires_grad=True)
        mixed = mixture(v, w, a)
        (mixed["p"].pow(2).sum() / 2).backward()
        assert a.grad.item() == expected
        assert alpha_gradient(v, w, {"p": mixed["p"].detach()}).item() == expected


def test_the_uploaded_global_update_is_plain_sgd():
    """v and alpha take their steps outside w's gradients: w trains as client=sgd does."""
    data, config = blobs(), ConfigRecord({"server-round": 1})
    apfl = APFLTrainer(model_fn, **SGD).train(initial(), config, data, RecordDict())
    plain = SGDTrainer(model_fn, **SGD).train(initial(), config, data, RecordDict())
    for key, value in plain.arrays.to_torch_state_dict().items():
        assert torch.equal(apfl.arrays.to_torch_state_dict()[key], value)
    assert 0.0 <= apfl.state[MIXING]["alpha"] <= 1.0 and LOCAL in apfl.state


def test_alpha_one_trains_v_as_local_sgd_and_alpha_zero_scores_the_global_model():
    data, config = blobs(), ConfigRecord({"server-round": 1})
    local = APFLTrainer(model_fn, alpha=1.0, adapt_alpha=False, **SGD).train(
        initial(), config, data, RecordDict())
    v, w = local.state[LOCAL].to_torch_state_dict(), local.arrays.to_torch_state_dict()
    for key in w:  # same batches, same steps; SGD's fused update may round differently
        torch.testing.assert_close(v[key], w[key], rtol=1e-5, atol=1e-6)
    shy = APFLTrainer(model_fn, alpha=0.0, adapt_alpha=False, **SGD)
    out = shy.train(initial(), config, data, RecordDict())
    metrics = shy.evaluate(out.arrays, ConfigRecord({}), data, out.state)
    assert metrics["accuracy"] == metrics["global-accuracy"]


def test_an_apfl_run_learns_alpha(tiny_cfg):
    cfg = tiny_cfg("method=apfl", "num_rounds=3")
    run_experiment(cfg)
    last = read_metrics(cfg.output_dir)[-1]
    assert {"client_eval/mean-accuracy", "client_eval/mean-global-accuracy",
            "train/alpha"} <= set(last)


@pytest.mark.parametrize("override", ["client.alpha=1.5", "client.alpha_lr=-1"])
def test_bad_apfl_settings_are_refused_by_name(tiny_cfg, override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        run_experiment(tiny_cfg("method=apfl", override))
