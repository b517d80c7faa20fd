"""SCAFFOLD: the server and client math by hand, its reduction to FedAvg, and runs."""

import numpy as np
import pytest
import torch
from conftest import read_metrics
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedsim.clients.scaffold import (
    CLIENT_CONTROL,
    ScaffoldTrainer,
    correction_term,
    option_two,
)
from fedsim.clients.sgd import SGDTrainer
from fedsim.errors import ConfigError
from fedsim.experiment import run_experiment
from fedsim.models import MLP
from fedsim.strategies.scaffold import CONTROL, Scaffold, server_update, split_control
from tests.test_trainer import blobs

SCAFFOLD = ["strategy=scaffold", "client=scaffold"]


def test_server_update_by_hand():
    """2 clients of N = 4, 3 parameters.

    x = (1, 2, 3); y_1 = (0, 2, 4), y_2 = (2, 2, 0): y_i - x = (-1, 0, 1), (1, 0, -3),
    mean (0, 0, -1), so x' = (1, 2, 2) at eta_g 1 and (1, 2, 2.5) at eta_g 0.5.
    c = (0.5, 0, 0); dc_1 = (1, 1, 0), dc_2 = (-1, 3, 2): mean (0, 2, 1), times
    |S|/N = 2/4: c' = (0.5, 1, 0.5).
    """
    x = {"w": np.array([1.0, 2.0, 3.0])}
    c = {"w": np.array([0.5, 0.0, 0.0])}
    y = [{"w": np.array([0.0, 2.0, 4.0])}, {"w": np.array([2.0, 2.0, 0.0])}]
    dc = [{"w": np.array([1.0, 1.0, 0.0])}, {"w": np.array([-1.0, 3.0, 2.0])}]
    new_x, new_c = server_update(x, c, y, dc, num_clients=4, global_lr=1.0)
    assert np.allclose(new_x["w"], [1, 2, 2]) and np.allclose(new_c["w"], [0.5, 1, 0.5])
    half, _ = server_update(x, c, y, dc, num_clients=4, global_lr=0.5)
    assert np.allclose(half["w"], [1, 2, 2.5])


def test_option_two_by_hand():
    """c_i = (1, 0, 0), c = (0, 1, 0), x = (1, 1, 1), y_i = (0, 1, 3), K = 2, eta = 0.5:
    (x - y_i) / (K eta) = (1, 0, -2); c_i - c = (1, -1, 0); c_i+ = (2, -1, -2)."""
    got = option_two(np.array([1.0, 0, 0]), np.array([0.0, 1, 0]), np.ones(3),
                     np.array([0.0, 1, 3]), steps=2, lr=0.5)
    assert np.allclose(got, [2, -1, -2])


def test_the_correction_term_adds_c_minus_c_i_to_the_gradient():
    w = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    c, c_i = {"w": torch.tensor([1.0, 0.0, -1.0])}, {"w": torch.tensor([0.5, 2.0, 1.0])}
    correction_term({"w": w}, c, c_i).backward()
    assert torch.equal(w.grad, torch.tensor([0.5, -2.0, -2.0]))


def model_fn() -> MLP:
    return MLP([6], 3, hidden=[8])


def initial_record(control: float = 0.0) -> ArrayRecord:
    torch.manual_seed(0)
    state = {k: v.numpy() for k, v in model_fn().state_dict().items()}
    return ArrayRecord({**{k: Array(v) for k, v in state.items()},
                        **{CONTROL + k: Array(np.full_like(v, control)) for k, v in state.items()}})


def test_with_zero_variates_the_client_trains_as_plain_sgd():
    """Zero variates add an exactly-zero term to every gradient: bit-identical weights."""
    settings = {"seed": 0, "lr": 0.1, "momentum": 0.0, "local_epochs": 2, "batch_size": 16,
                "device": "cpu"}
    data, config = blobs(), ConfigRecord({"server-round": 1})
    record = initial_record()
    ours = ScaffoldTrainer(model_fn, **settings).train(record, config, data, RecordDict())
    model_part = ArrayRecord({k: record[k] for k in record if not k.startswith(CONTROL)})
    plain = SGDTrainer(model_fn, **settings).train(model_part, config, data, RecordDict())
    trained, change = split_control({k: v.numpy() for k, v in ours.arrays.items()})
    for key, value in plain.arrays.items():
        assert np.array_equal(trained[key], value.numpy())
    # option II with c = c_i = 0: c_i+ = (x - y) / (K eta); K = 2 epochs x ceil(120 / 16)
    steps = 2 * 8
    x, _ = split_control({k: v.numpy() for k, v in record.items()})
    expected = (x["net.1.weight"] - trained["net.1.weight"]) / (steps * 0.1)
    assert np.allclose(change["net.1.weight"], expected, atol=1e-6)  # float32 division
    state = ours.state[CLIENT_CONTROL]
    assert np.array_equal(state["net.1.weight"].numpy(), change["net.1.weight"])


def test_nonzero_variates_change_the_trajectory_and_carry_over():
    settings = {"seed": 0, "lr": 0.1, "momentum": 0.0, "local_epochs": 1, "device": "cpu"}
    trainer = ScaffoldTrainer(model_fn, **settings)
    data, config = blobs(), ConfigRecord({"server-round": 1})
    zero = trainer.train(initial_record(0.0), config, data, RecordDict())
    shifted = trainer.train(initial_record(0.05), config, data, RecordDict())
    assert not np.array_equal(zero.arrays["net.1.weight"].numpy(),
                              shifted.arrays["net.1.weight"].numpy())
    again = trainer.train(initial_record(0.0), ConfigRecord({"server-round": 2}), data,
                          zero.state)  # c_i from round 1 now corrects the steps
    assert not np.array_equal(again.arrays["net.1.weight"].numpy(),
                              zero.arrays["net.1.weight"].numpy())


def test_the_server_sends_its_variate_and_keeps_it_out_of_the_global_model():
    strategy = Scaffold(num_clients=4)
    record = initial_record()
    x, _ = split_control({k: v.numpy() for k, v in record.items()})
    strategy.current_arrays = {k: v.numpy() for k, v in record.items()}
    strategy.control = {k: np.zeros_like(v) for k, v in x.items()}
    up = [{**x, **{CONTROL + k: np.ones_like(v) for k, v in x.items()}} for _ in range(2)]
    uploads = [(i, ArrayRecord({k: Array(v) for k, v in u.items()})) for i, u in enumerate(up)]
    new, metrics = strategy.aggregate_uploads(1, uploads)
    assert set(new.keys()) == set(x)  # the variates stay on the server
    assert all(np.allclose(v, 0.5) for v in strategy.control.values())  # 2 of 4 clients
    assert metrics["control-norm"] > 0


def test_a_scaffold_run_trains_and_reports_the_variate_norm(tiny_cfg):
    cfg = tiny_cfg(*SCAFFOLD, "num_rounds=3")
    run_experiment(cfg)
    rows = read_metrics(cfg.output_dir)
    assert rows[-1]["server/accuracy"] > rows[0]["server/accuracy"]
    norms = [r["train/control-norm"] for r in rows[1:]]
    assert all(n > 0 for n in norms)


@pytest.mark.parametrize("override", ["strategy.global_lr=0", "strategy.num_clients=0"])
def test_bad_scaffold_settings_are_refused_by_name(tiny_cfg, override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        run_experiment(tiny_cfg(*SCAFFOLD, override))


def test_the_strategy_refuses_a_client_that_does_not_send_variates(tiny_cfg):
    with pytest.raises(ConfigError, match="client"):
        run_experiment(tiny_cfg("strategy=scaffold", "client=sgd"))
