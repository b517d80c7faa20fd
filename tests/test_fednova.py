"""FedNova: the normalized update and the normalizing factor by hand, FedAvg as its special
case, and a run whose clients take different numbers of steps."""

import numpy as np
import pytest
from conftest import read_metrics
from flwr.app import Array, ArrayRecord

from fedsim.clients.fednova import normalizing_factor
from fedsim.errors import MessageError
from fedsim.experiment import run_experiment
from fedsim.strategies.fednova import FACTOR, FedNova, normalized_update


def test_the_normalized_update_by_hand():
    """x = 0; y_1 = (2, 0, 4) after a_1 = 2 steps on n_1 = 1 sample, y_2 = (0, 3, 0) after
    a_2 = 1 step on n_2 = 3: p = (1/4, 3/4), tau_eff = 1/4 * 2 + 3/4 * 1 = 1.25.
    (x - y_i) / a_i = (-1, 0, -2) and (0, -3, 0); their p-mean is (-0.25, -2.25, -0.5);
    x' = -1.25 * that = (0.3125, 2.8125, 0.625). FedAvg would give (0.5, 2.25, 1).
    """
    x = {"w": np.zeros(3)}
    ys = [{"w": np.array([2.0, 0.0, 4.0])}, {"w": np.array([0.0, 3.0, 0.0])}]
    new, tau_eff = normalized_update(x, ys, factors=[2.0, 1.0], samples=[1.0, 3.0])
    assert tau_eff == 1.25 and np.allclose(new["w"], [0.3125, 2.8125, 0.625])


def test_equal_factors_give_fedavg_s_weighted_mean():
    rng = np.random.default_rng(0)
    x = {"w": rng.normal(size=4)}
    ys = [{"w": rng.normal(size=4)} for _ in range(3)]
    samples = [10.0, 30.0, 60.0]
    new, _ = normalized_update(x, ys, factors=[5.0] * 3, samples=samples)
    fedavg = sum(n * y["w"] for n, y in zip(samples, ys, strict=True)) / sum(samples)
    assert np.allclose(new["w"], fedavg)  # float rounding differs between the two formulas


def test_the_normalizing_factor_by_hand():
    """tau = 3, rho = 0.5: (1 - .5)/.5 + (1 - .25)/.5 + (1 - .125)/.5 = 1 + 1.5 + 1.75."""
    assert normalizing_factor(3, 0.0) == 3.0
    assert normalizing_factor(3, 0.5) == pytest.approx(4.25)


@pytest.mark.parametrize(("steps", "momentum"), [(1, 0.9), (7, 0.0), (7, 0.9), (30, 0.5)])
def test_the_factor_is_how_far_torch_s_sgd_moves_on_a_constant_gradient(steps, momentum):
    """Loss <g, w> has gradient g at every step, so tau steps of torch's SGD move w by
    -lr * a * g exactly when a is the sum of the gradients' weights."""
    import torch

    w = torch.zeros(3, requires_grad=True)
    g = torch.tensor([1.0, -2.0, 0.5])
    optimizer = torch.optim.SGD([w], lr=0.1, momentum=momentum)
    for _ in range(steps):
        optimizer.zero_grad()
        (g * w).sum().backward()
        optimizer.step()
    moved = -w.detach() / (0.1 * g)
    assert moved.numpy() == pytest.approx([normalizing_factor(steps, momentum)] * 3, rel=1e-5)


def test_a_reply_without_its_factor_is_refused_with_the_node():
    strategy = FedNova()
    strategy.current_arrays = {"w": np.zeros(2, np.float32)}
    strategy.upload_metrics = {7: {"num-examples": 5}}
    with pytest.raises(MessageError, match=f"node 7.*{FACTOR}"):
        strategy.aggregate_uploads(1, [(7, ArrayRecord({"w": Array(np.ones(2, np.float32))}))])


def test_clients_with_different_step_counts_are_normalized(tiny_cfg):
    """Size-skewed clients take different numbers of steps: tau_eff is their p-mean, not
    any one client's count."""
    cfg = tiny_cfg("method=fednova", "partition=size_skew", "client.momentum=0.0",
                   "num_rounds=2")
    run_experiment(cfg)
    rows = read_metrics(cfg.output_dir)
    assert rows[-1]["server/accuracy"] > rows[0]["server/accuracy"]
    steps = [r["train/tau-eff"] for r in rows[1:]]
    assert all(s > 0 and not float(s).is_integer() for s in steps)  # a mean of unequal counts
