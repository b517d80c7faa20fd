"""Batched cohorts (`fedsim.clients.cohort`, `SGDTrainer.train_cohort`) against the
sequential trainer, and the hand-worked pieces they are built from."""

from functools import partial

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from fedsim.clients.cohort import SGDRule, cohort_sgd, model_problem, padded_steps
from fedsim.clients.fedld import FedLDTrainer
from fedsim.clients.sgd import SGDTrainer
from fedsim.datasets.federated import ClientData
from fedsim.models import CNN1D, MLP

# float32 sums run in another order in a batched matmul than in a single client's: the
# trained weights agree to float32 rounding accumulated over a few dozen steps, not bit
# for bit. 1e-5 relative is ~100 ulps, far below any difference a wrong step would make.
RTOL, ATOL = 1e-5, 1e-6


def client(partition_id: int, n: int, features=(6,)) -> ClientData:
    gen = torch.Generator().manual_seed(partition_id)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.randn(n, *features, generator=gen)
    x[:, 0] += 2 * y
    return ClientData(partition_id, x, y, x[:5], y[:5], num_classes=3)


def mlp() -> nn.Module:
    return MLP([6], 3, hidden=[16])


def arrays_of(model_fn, seed: int) -> ArrayRecord:
    torch.manual_seed(seed)
    return ArrayRecord(model_fn().state_dict())


def assert_same_outputs(sequential, batched) -> None:
    for one, other in zip(sequential, batched, strict=True):
        a, b = one.arrays.to_torch_state_dict(), other.arrays.to_torch_state_dict()
        assert list(a) == list(b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=RTOL, atol=ATOL)
        assert set(one.metrics) == set(other.metrics)
        assert other.metrics["num-examples"] == one.metrics["num-examples"]
        assert other.metrics["train_loss"] == pytest.approx(one.metrics["train_loss"], rel=1e-5)


@pytest.mark.parametrize("settings", [
    {"momentum": 0.0},
    {"momentum": 0.9, "weight_decay": 1e-3},
    {"momentum": 0.9, "proximal_mu": 0.5},
])
def test_a_batched_cohort_trains_each_client_as_the_sequential_trainer(settings):
    """Clients of different sizes (ragged last batches, different step counts, one with a
    single sample), each from its own weights, over 3 local epochs."""
    trainer = SGDTrainer(mlp, seed=3, lr=0.1, local_epochs=3, batch_size=8, **settings)
    config = ConfigRecord({"server-round": 2})
    jobs = [(arrays_of(mlp, c), config, client(c, n), RecordDict())
            for c, n in enumerate([20, 8, 1, 13])]
    assert trainer.cohort_problem() is None
    sequential = [trainer.train(*job) for job in jobs]
    assert_same_outputs(sequential, trainer.train_cohort(jobs))


def test_a_cohort_of_a_conv_net_matches_too():
    model_fn = partial(CNN1D, [40], 3)
    trainer = SGDTrainer(model_fn, seed=1, lr=0.05, local_epochs=1, batch_size=16)
    config = ConfigRecord({"server-round": 1})
    shared = arrays_of(model_fn, 0)  # one global model for all, as FedAvg sends
    jobs = [(shared, config, client(c, n, (40,)), RecordDict()) for c, n in enumerate([30, 40])]
    assert trainer.cohort_problem() is None
    assert_same_outputs([trainer.train(*job) for job in jobs], trainer.train_cohort(jobs))


def test_in_float64_the_two_paths_agree_to_1e_12_over_several_epochs():
    """Same arithmetic, other summation order: in float64 the rounding is 1e-16, so what
    is left after 5 epochs with momentum is the algorithm, and it must vanish."""
    model_fn = partial(CNN1D, [40], 3)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        trainer = SGDTrainer(model_fn, seed=2, lr=0.1, momentum=0.9, local_epochs=5,
                             batch_size=8, proximal_mu=0.1)
        config = ConfigRecord({"server-round": 4})
        jobs = [(arrays_of(model_fn, c), config, client(c, n, (40,)), RecordDict())
                for c, n in enumerate([17, 9, 24])]
        sequential = [trainer.train(*job) for job in jobs]
        batched = trainer.train_cohort(jobs)
    finally:
        torch.set_default_dtype(previous)
    for one, other in zip(sequential, batched, strict=True):
        a, b = one.arrays.to_torch_state_dict(), other.arrays.to_torch_state_dict()
        assert all(t.dtype == torch.float64 for t in [*a.values(), *b.values()])
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-12, atol=1e-12)


def test_clients_of_different_round_settings_train_in_their_own_groups():
    trainer = SGDTrainer(mlp, seed=0, lr=0.1, momentum=0.0, local_epochs=1, batch_size=4)
    configs = [ConfigRecord({"server-round": 1}), ConfigRecord({"server-round": 1, "lr": 0.01}),
               ConfigRecord({"server-round": 1, "batch-size": 3})]
    jobs = [(arrays_of(mlp, 0), config, client(c, 10), RecordDict())
            for c, config in enumerate(configs)]
    assert_same_outputs([trainer.train(*job) for job in jobs], trainer.train_cohort(jobs))


def test_what_cannot_be_batched_says_why():
    assert "FedLDTrainer changes" in FedLDTrainer(mlp).cohort_problem()
    assert "cosine" in SGDTrainer(mlp, cosine_epochs=True).cohort_problem()
    adam = partial(torch.optim.Adam)
    assert "not plain SGD" in SGDTrainer(mlp, optimizer=adam).cohort_problem()
    dropout = SGDTrainer(lambda: nn.Sequential(nn.Linear(6, 3), nn.Dropout(0.5)))
    assert "Dropout" in dropout.cohort_problem()
    assert "buffers" in model_problem(nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3)))
    nesterov = partial(torch.optim.SGD, momentum=0.9, nesterov=True)
    assert "not plain SGD" in SGDTrainer(mlp, optimizer=nesterov).cohort_problem()
    tied = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
    tied[2].weight = tied[0].weight
    assert "ties weights" in model_problem(tied)
    assert model_problem(mlp()) is None


def test_padded_steps_by_hand():
    """Two clients: one with batches [1, 0] and [2], one with a single batch [0, 1]; the
    second's data starts at row 3 of the concatenation."""
    batches = [[torch.tensor([1, 0]), torch.tensor([2])], [torch.tensor([0, 1])]]
    rows, weights, active = padded_steps(batches, offsets=[0, 3], batch_size=2)
    assert rows.tolist() == [[[1, 0], [3, 4]], [[2, 0], [0, 0]]]
    assert weights.tolist() == [[[0.5, 0.5], [0.5, 0.5]], [[1.0, 0.0], [0.0, 0.0]]]
    assert active.tolist() == [[True, True], [True, False]]


def test_cohort_sgd_by_hand():
    """A linear model without bias, weights [a, b], input x = 1, label 0: cross-entropy
    log(1 + exp(b - a)); d/da = -(1 - s), d/db = 1 - s with s = sigmoid(a - b).
    From a = b = 0 with lr 0.1: step 1 has s = 0.5, so a = 0.05, b = -0.05 (loss log 2);
    step 2 has s = sigmoid(0.1), so a = 0.05 + 0.1 (1 - s) = -b (loss log(1 + e^-0.1)).
    Client 0 takes both steps; client 1 has one batch, then sits still."""
    model = nn.Linear(1, 2, bias=False)
    start = {"weight": torch.zeros(2, 1)}
    x, y = torch.ones(3, 1), torch.zeros(3, dtype=torch.int64)
    rows, weights, active = padded_steps([[torch.tensor([0]), torch.tensor([1])],
                                          [torch.tensor([0])]], [0, 2], 1)
    params, totals = cohort_sgd(model, [start, start], x, y, rows, weights, active,
                                SGDRule(lr=0.1))
    a = 0.05 + 0.1 * (1 - 1 / (1 + np.exp(-0.1)))
    assert params["weight"][0].flatten().tolist() == pytest.approx([a, -a], rel=1e-6)
    assert params["weight"][1].flatten().tolist() == pytest.approx([0.05, -0.05], rel=1e-6)
    assert totals[:, 1].tolist() == [2.0, 1.0]
    assert totals[:, 0].tolist() == pytest.approx(
        [np.log(2) + np.log(1 + np.exp(-0.1)), np.log(2)], rel=1e-6)


def test_momentum_by_hand():
    """torch's SGD momentum: the first buffer is the gradient, then m * buf + grad. With a
    constant gradient g (a linear loss through cross-entropy is not constant, so use the
    update rule alone): p1 = p0 - lr g, p2 = p1 - lr (m g + g)."""
    from fedsim.clients.cohort import sgd_update

    params = {"w": torch.zeros(2, 1)}
    grads = {"w": torch.ones(2, 1)}
    on = torch.tensor([True, False])
    rule = SGDRule(lr=0.1, momentum=0.9)
    buffers = sgd_update(params, grads, None, on, rule)
    buffers = sgd_update(params, grads, buffers, on, rule)
    assert params["w"][:, 0].tolist() == pytest.approx([-0.1 - 0.19, 0.0])


def test_weight_decay_and_the_proximal_term_by_hand():
    """One weight w, a zero data gradient (weights 0 on every row), w0 = 1, lr 0.1.
    Weight decay 0.5 adds 0.5 w to the gradient: w1 = 1 - 0.1 * 0.5 = 0.95.
    The proximal term mu/2 (w - anchor)^2 has gradient mu (w - anchor) = 0 at the anchor,
    so only decay moves step 1; at step 2 it adds mu * (0.95 - 1) = -0.05 with mu = 1:
    w2 = 0.95 - 0.1 * (0.5 * 0.95 - 0.05) = 0.9075."""
    model = nn.Linear(1, 1, bias=False)
    start = {"weight": torch.ones(1, 1)}
    rows = torch.zeros(2, 1, 1, dtype=torch.int64)
    weights = torch.zeros(2, 1, 1)  # no data term
    active = torch.ones(2, 1, dtype=torch.bool)
    x, y = torch.ones(1, 1), torch.zeros(1, dtype=torch.int64)
    params, totals = cohort_sgd(model, [start], x, y, rows, weights, active,
                                SGDRule(lr=0.1, weight_decay=0.5, mu=1.0))
    assert params["weight"].item() == pytest.approx(0.9075, rel=1e-6)
    assert totals[0, 0].item() == pytest.approx(0.5 * 0.05**2, rel=1e-4)  # step 2's term
