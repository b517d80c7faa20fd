"""Stale updates on a virtual clock, their corrections, and staleness inversion."""

import json
import math
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
import torch
from conftest import read_metrics, without_timing
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn

from fedsim.clients.sgd import SGDTrainer
from fedsim.clock import (
    FixedDelay,
    NoDelay,
    RandomDelay,
    SlowClassHolders,
    VirtualClock,
    staleness_weight,
)
from fedsim.datasets.federated import ClientData, build_federated_data
from fedsim.errors import ConfigError
from fedsim.experiment import run_experiment
from fedsim.inversion import (
    LocalProcedure,
    invert_update,
    simulate_update,
    soft_label_loss,
    update_norm,
)
from fedsim.metrics import classification_metrics, count_key
from fedsim.models import MLP
from fedsim.strategies.dc_asgd import first_order_correction
from fedsim.strategies.stale import (
    Dispatch,
    StaleFedAvg,
    StaleUpdate,
    model_mixing_delta,
    summarize_updates,
    sync_staleness,
)
from fedsim.strategies.staleness_inversion import StalenessInversion

FULL_BATCH = ["client.batch_size=100000", "client.local_epochs=2", "client.lr=0.3"]


def read_updates(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "updates.jsonl").read_text().splitlines()]


# ---- the virtual clock and the device models ------------------------------------------


def test_clock_orders_arrivals_by_time_then_dispatch_order():
    clock = VirtualClock()
    for node, duration in [(1, 3.0), (2, 1.0), (3, 3.0), (4, 1.0), (5, 2.0)]:
        clock.schedule(node, duration)
    assert [a.node_id for a in clock.pop(2)] == [2, 4]
    assert clock.now == 1.0
    assert [a.node_id for a in clock.pending()] == [5, 1, 3]
    clock.schedule(6, 2.0)  # arrives at 3.0, after 1 and 3 that were dispatched first
    assert [a.node_id for a in clock.pop(10)] == [5, 1, 3, 6]
    assert clock.now == 3.0 and len(clock) == 0
    assert clock.pop(1) == [] and clock.now == 3.0


class FakeGrid:
    """Nodes 1..n whose 'training' adds a node-specific step to the received weights."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))

    def send_and_receive(self, messages, *, timeout=None):
        return [fake_reply(m) for m in messages]


def fake_reply(msg: Message) -> Message:
    msg.metadata.__dict__["_message_id"] = uuid4().hex
    w = msg.content["arrays"]["w"].numpy()
    node = msg.metadata.dst_node_id
    content = RecordDict({"arrays": ArrayRecord({"w": Array(w + np.float32(node))}),
                          "metrics": MetricRecord({"num-examples": node})})
    return Message(content, reply_to=msg)


def drive(strategy: StaleFedAvg, rounds: int, reverse: bool) -> list[np.ndarray]:
    """Run the strategy's train rounds on FakeGrid, replies in node or reversed order."""
    import random

    random.seed(0)
    grid, arrays, history = FakeGrid(8), ArrayRecord({"w": Array(np.zeros(3, np.float32))}), []
    for server_round in range(1, rounds + 1):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        replies = sorted((fake_reply(m) for m in messages),
                         key=lambda r: r.metadata.src_node_id, reverse=reverse)
        arrays, _ = strategy.aggregate_train(server_round, replies)
        history.append(arrays["w"].numpy().copy())
    return history


@pytest.mark.parametrize("settings", [
    {"mode": "sync", "weighting": "exponential"},
    {"mode": "async", "buffer_size": 2, "concurrency": 4, "weighting": "polynomial"},
], ids=["sync", "async"])
def test_the_run_does_not_depend_on_the_order_replies_come_back_in(settings):
    def strategy():
        s = StaleFedAvg(**settings, min_train_nodes=4, fraction_train=0.5,
                        min_available_nodes=8)
        s.delays = {n: float(n % 3) for n in range(1, 9)}
        return s

    forward, backward = drive(strategy(), 6, False), drive(strategy(), 6, True)
    for a, b in zip(forward, backward, strict=True):
        assert a.tobytes() == b.tobytes()
    assert not np.array_equal(forward[0], forward[-1])


def test_slow_class_holders_are_the_clients_holding_that_class():
    counts = np.array([[5, 0, 1], [0, 4, 0], [2, 2, 0], [0, 0, 9]])
    assert SlowClassHolders(slow_class=0, delay=7).delays(counts, 0).tolist() == [7, 0, 7, 0]
    top = SlowClassHolders(slow_class=2, delay=3, top_k=1).delays(counts, 0)
    assert top.tolist() == [0, 0, 0, 3]
    assert SlowClassHolders(slow_class=0).slow_classes() == [0]
    with pytest.raises(ConfigError, match=r"devices.slow_class must be a class index in \[0, 2\]"):
        SlowClassHolders(slow_class=3).delays(counts, 0)


def test_fixed_and_random_delays_are_seeded():
    counts = np.ones((10, 3))
    fixed = FixedDelay(delay=4, fraction=0.3).delays(counts, seed=1)
    assert sorted(fixed.tolist()) == [0] * 7 + [4] * 3
    assert fixed.tolist() == FixedDelay(delay=4, fraction=0.3).delays(counts, seed=1).tolist()
    draws = RandomDelay("exponential", scale=10).delays(np.ones((4000, 2)), seed=0)
    assert abs(draws.mean() - 10) < 0.6 and (draws == np.rint(draws)).all()
    lognormal = RandomDelay("lognormal", scale=5, round_to_int=False).delays(np.ones((4000, 2)), 0)
    assert abs(lognormal.mean() - 5) < 0.5
    assert NoDelay().delays(counts, 0).tolist() == [0.0] * 10


@pytest.mark.parametrize("make, message", [
    (lambda: FixedDelay(delay=-1), "devices.delay must be a number >= 0"),
    (lambda: FixedDelay(fraction=1.5), r"devices.fraction must be a number in \[0, 1\]"),
    (lambda: RandomDelay("pareto"), "devices.distribution must be one of"),
    (lambda: SlowClassHolders(top_k=0), "devices.top_k must be an integer >= 1"),
])
def test_bad_device_settings_are_named(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


# ---- pure rules ---------------------------------------------------------------------


def test_staleness_weights_by_hand():
    assert staleness_weight(40, "constant") == 1.0
    assert staleness_weight(20, "exponential", half_life=20) == 0.5
    assert staleness_weight(40, "exponential", half_life=20) == 0.25
    assert staleness_weight(3, "polynomial", exponent=0.5) == 0.5
    assert staleness_weight(10, "hinge", exponent=0.5, hinge_at=10) == 1.0
    assert staleness_weight(14, "hinge", exponent=0.5, hinge_at=10) == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match="strategy.weighting must be one of"):
        staleness_weight(1, "linear")


def test_first_order_correction_by_hand():
    delta = {"w": np.array([0.5, -1.0]), "n": np.array(3.0)}
    start = {"w": np.array([1.0, 1.0], np.float32), "n": np.array(2, np.int64)}
    current = {"w": np.array([2.0, 0.0], np.float32), "n": np.array(5, np.int64)}
    out = first_order_correction(delta, start, current, lam=4.0)
    # d - 4 d^2 (w_t - w_old): 0.5 - 4 * 0.25 * 1 = -0.5;  -1 - 4 * 1 * (-1) = 3
    assert out["w"].tolist() == [-0.5, 3.0]
    assert out["n"] == 3.0  # integer entries are not corrected


def test_model_mixing_counts_the_client_model_against_the_current_one():
    delta = {"w": np.array([1.0, 2.0])}
    start = {"w": np.array([0.0, 1.0], np.float32)}
    current = {"w": np.array([3.0, 1.0], np.float32)}
    # w_client = w_old + d = [1, 3]; relative to w_t = [3, 1]: [-2, 2]
    assert model_mixing_delta(delta, start, current)["w"].tolist() == [-2.0, 2.0]


def test_round_summary_of_applied_updates():
    infos = [{"staleness": 0}, {"staleness": 4, "inversion-seconds": 1.0},
             {"staleness": 2, "inversion-seconds": 3.0}]
    out = summarize_updates(infos, now=7.0)
    assert out == {"updates": 3.0, "stale-updates": 2.0, "staleness-mean": 2.0,
                   "staleness-max": 4.0, "virtual-time": 7.0, "inversion-seconds-mean": 2.0}


def test_one_class_accuracy_is_reported_with_its_own_count():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 1])
    metrics = classification_metrics(logits, labels, classes=[1])
    assert metrics["accuracy-class-1"] == pytest.approx(1 / 3)
    assert metrics["num-examples-class-1"] == 3
    assert count_key("accuracy-class-1") == "num-examples-class-1"
    assert count_key("mean-accuracy-class-12") == "num-examples-class-12"
    assert count_key("accuracy") == "num-examples"


# ---- gradient inversion -------------------------------------------------------------


def tiny_problem(samples=4, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    x = torch.randn(samples, 4)
    labels = 30 * nn.functional.one_hot(torch.randint(0, 3, (samples,)), 3).float()
    return model, params, x, labels


def test_soft_label_loss_with_one_hot_labels_is_cross_entropy():
    logits = torch.randn(5, 3)
    y = torch.tensor([0, 2, 1, 1, 0])
    one_hot = 1e4 * nn.functional.one_hot(y, 3).float()
    assert soft_label_loss(logits, one_hot) == pytest.approx(
        nn.functional.cross_entropy(logits, y).item(), abs=1e-6)
    with pytest.raises(ValueError, match="label loss must be one of"):
        soft_label_loss(logits, one_hot, "mse")


def test_unrolled_procedure_reproduces_the_sgd_trainer():
    """The server's re-run of a client (momentum, weight decay, steps) is the client's SGD."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    data = ClientData(0, x, y, x[:0], y[:0], num_classes=3)
    trainer = SGDTrainer(lambda: MLP([6], 3, hidden=[5]), lr=0.2, momentum=0.9,
                         weight_decay=0.01, local_epochs=3, batch_size=100, device="cpu")
    torch.manual_seed(1)
    start = ArrayRecord(MLP([6], 3, hidden=[5]).state_dict())
    out = trainer.train(start, ConfigRecord({"server-round": 1}), data, RecordDict())
    trained, initial = out.arrays.to_torch_state_dict(), start.to_torch_state_dict()
    model = MLP([6], 3, hidden=[5]).eval()
    procedure = trainer.local_procedure(num_train=12, server_round=1)
    assert procedure == LocalProcedure(lr=0.2, steps=3, momentum=0.9, weight_decay=0.01)
    simulated = simulate_update(model, initial, {}, x, 1e4 * nn.functional.one_hot(y, 3).float(),
                                procedure)
    for name, update in simulated.items():
        torch.testing.assert_close(update, trained[name] - initial[name], atol=1e-5, rtol=1e-4)


def test_minibatch_clients_are_unrolled_step_for_step():
    trainer = SGDTrainer(lambda: MLP([2], 2), lr=0.1, momentum=0.0, lr_decay=0.5,
                         local_epochs=2, batch_size=32, device="cpu")
    assert trainer.local_procedure(num_train=70, server_round=3) == LocalProcedure(
        lr=0.1 * 0.25, steps=2 * 3)
    with pytest.raises(ValueError, match="proximal_mu"):
        SGDTrainer(lambda: MLP([2], 2), proximal_mu=0.1).local_procedure(10, 1)


def test_inversion_recovers_data_whose_update_matches():
    model, params, x, labels = tiny_problem()
    procedure = LocalProcedure(lr=0.5, steps=2)
    target = simulate_update(model, params, {}, x, labels, procedure)
    generator = torch.Generator().manual_seed(1)
    inversion = invert_update(model, params, {}, target, procedure,
                              torch.randn(4, 4, generator=generator),
                              torch.randn(4, 3, generator=generator), iterations=1000, lr=0.1)
    assert inversion.distance < inversion.initial_distance / 100  # orders of magnitude
    refit = simulate_update(model, params, {}, inversion.inputs, inversion.labels, procedure)
    error = sum((refit[k] - target[k]).abs().sum() for k in target)
    assert float(error) == pytest.approx(inversion.distance, rel=1e-4)
    assert inversion.seconds > 0


def test_inversion_keeps_inputs_in_range_and_never_returns_worse_than_its_start():
    model, params, x, labels = tiny_problem()
    procedure = LocalProcedure(lr=0.5, steps=1)
    target = simulate_update(model, params, {}, x, labels, procedure)
    inversion = invert_update(model, params, {}, target, procedure, torch.zeros(4, 4),
                              torch.zeros(4, 3), iterations=30, lr=1.0, input_range=(-0.5, 0.5))
    assert inversion.inputs.abs().max() <= 0.5
    assert inversion.distance <= inversion.initial_distance


@pytest.fixture(scope="module")
def bound_inversion():
    """A StalenessInversion bound to a tiny digits federation with full-batch clients."""
    from fedsim.config import compose

    cfg = compose(["dataset=digits", "model=mlp", "model.hidden=[16]", "num_clients=4",
                   "clients_per_round=2", "strategy=staleness_inversion", "logger=none",
                   "client.momentum=0.0", *FULL_BATCH, "strategy.iterations=400",
                   "strategy.dummy_size=32", "devices=fixed", "devices.delay=3"])
    data = build_federated_data(cfg)
    strategy = StalenessInversion(**{k: v for k, v in cfg.strategy.items() if k != "_target_"},
                                  min_train_nodes=2)
    strategy.bind_run(cfg, data)
    return cfg, data, strategy


def client_delta(strategy, data, arrays: ArrayRecord, node: int) -> dict[str, np.ndarray]:
    out = strategy.trainer.train(arrays, ConfigRecord({"server-round": 1}),
                                 data.client(node - 1), RecordDict())
    trained = out.arrays.to_numpy_ndarrays()
    return {key: t - a for key, t, a in zip(arrays.keys(), trained,
                                             arrays.to_numpy_ndarrays(), strict=True)}


def test_with_no_drift_the_conversion_is_close_to_the_identity(bound_inversion):
    cfg, data, strategy = bound_inversion
    strategy.estimates = {}
    torch.manual_seed(0)
    arrays = ArrayRecord(strategy.model.state_dict())
    strategy.versions = {1: arrays}
    delta = client_delta(strategy, data, arrays, node=1)
    current = {key: array.numpy() for key, array in arrays.items()}
    update = StaleUpdate(Dispatch(1, 1, 1.0), delta, RecordDict(), current)
    converted, info = strategy.correct(update, current, staleness=1)  # same model: no drift
    error = sum(np.abs(converted[k] - delta[k]).sum() for k in delta)
    norm = sum(np.abs(d).sum() for d in delta.values())
    assert error / norm < 0.1
    assert info["converted"] == 1.0 and info["inversion-residual"] < 0.1
    assert info["inversion-drift"] == pytest.approx(0.0, abs=1e-6)  # same model: no drift
    # kept, and the next conversion of this client starts from it
    assert strategy._initial_estimate(1, 7)[0] is strategy.estimates[1][0]
    strategy.estimates = {}
    fresh = strategy._initial_estimate(1, 7)
    assert fresh[0].shape == (32, *data.input_shape) and fresh[1].shape == (32, 10)


def test_conversion_moves_a_stale_update_towards_the_fresh_one(bound_inversion):
    cfg, data, strategy = bound_inversion
    strategy.estimates = {}
    torch.manual_seed(3)
    old = ArrayRecord(strategy.model.state_dict())
    old_np = {key: array.numpy() for key, array in old.items()}
    # the model three rounds later: what the other clients' updates did meanwhile
    drifted = dict(old_np)
    for _ in range(3):
        step = client_delta(strategy, data, _record(drifted), node=2)
        drifted = {k: (drifted[k] + step[k]).astype(np.float32) for k in drifted}
    strategy.versions = {1: old, 4: _record(drifted)}
    stale = client_delta(strategy, data, old, node=1)
    truth = client_delta(strategy, data, _record(drifted), node=1)
    update = StaleUpdate(Dispatch(1, 1, 1.0), stale, RecordDict(), old_np)
    converted, info = strategy.correct(update, drifted, staleness=3)

    def error(d):
        return sum(np.abs(d[k] - truth[k]).sum() for k in truth)

    assert error(converted) < error(stale)
    assert info["inversion-drift"] > 0


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    from flwr.app import Array

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


# ---- runs ---------------------------------------------------------------------------


def test_stale_fedavg_without_delays_is_fedavg(tiny_cfg):
    plain = tiny_cfg("num_rounds=3")
    stale = tiny_cfg("num_rounds=3", "strategy=stale")
    run_experiment(plain)
    run_experiment(stale)
    a, b = read_metrics(plain.output_dir), read_metrics(stale.output_dir)
    # Two code paths: Flower's FedAvg sums weights in float32 in arrival order, StaleFedAvg
    # adds the float64 mean of float32 deltas in node order and rounds once. Weights differ
    # by a few float32 ulps (eps 1.2e-7) a round; after 3 rounds of training the loss agrees
    # to ~1e-6, so rel=1e-5 leaves 10x headroom, and at most one test sample at a near-tie
    # may change its argmax.
    test_size = len(build_federated_data(plain).server_test()[1])
    for row_a, row_b in zip(a, b, strict=True):
        if "server/loss" in row_a:
            assert row_b["server/loss"] == pytest.approx(row_a["server/loss"], rel=1e-5)
            assert row_b["server/accuracy"] == pytest.approx(row_a["server/accuracy"],
                                                             abs=1 / test_size)
    assert b[-1]["train/staleness-max"] == 0.0


def test_stale_aggregation_without_delays_equals_fedavg_to_float32_rounding():
    """The same replies through FedAvg's and StaleFedAvg's aggregation: the two differ only
    in summation order and width, so they agree to a few float32 ulps of the weights."""
    from flwr.serverapp.strategy import FedAvg

    rng = np.random.default_rng(0)
    strategy = StaleFedAvg(min_train_nodes=3, fraction_train=1.0, min_available_nodes=3)
    start = ArrayRecord({"w": Array(rng.normal(size=300).astype(np.float32))})
    messages = strategy.configure_train(1, start, ConfigRecord(), FakeGrid(3))
    replies = []
    for msg in messages:
        trained = msg.content["arrays"]["w"].numpy() + rng.normal(scale=0.1, size=300)
        node = msg.metadata.dst_node_id
        content = RecordDict({"arrays": ArrayRecord({"w": Array(trained.astype(np.float32))}),
                              "metrics": MetricRecord({"num-examples": 7 * node + 3})})
        msg.metadata.__dict__["_message_id"] = uuid4().hex
        replies.append(Message(content, reply_to=msg))
    stale, _ = strategy.aggregate_train(1, replies)
    plain, _ = FedAvg().aggregate_train(1, replies)
    np.testing.assert_allclose(stale["w"].numpy(), plain["w"].numpy(), rtol=1e-6, atol=1e-6)


def test_sync_staleness_by_hand():
    """A client 3 rounds slow. reference: fresh in rounds 1-3 (no model of 3 rounds ago
    yet), then 3 late (round 4 reads model 1). initial: as late as the run allows from
    round 2 on (rounds 2, 3, 4 all read model 1), then 3 late."""
    rounds = range(1, 7)
    assert [sync_staleness(3, r) for r in rounds] == [0, 0, 0, 3, 3, 3]
    assert [sync_staleness(3, r, "initial") for r in rounds] == [0, 1, 2, 3, 3, 3]
    assert [sync_staleness(0, r, "initial") for r in rounds] == [0] * 6


@pytest.mark.parametrize("startup", ["reference", "initial"])
def test_sync_slow_clients_train_on_the_model_of_delay_rounds_ago(tiny_cfg, startup):
    cfg = tiny_cfg("num_rounds=5", "strategy=stale", "devices=fixed", "devices.delay=2",
                   "devices.fraction=0.5", "clients_per_round=6", f"strategy.startup={startup}")
    run_experiment(cfg)
    delays = FixedDelay(delay=2, fraction=0.5).delays(np.ones((6, 1)), cfg.seed)
    updates = read_updates(cfg.output_dir)
    assert len(updates) == 5 * 6
    for update in updates:
        delay, round_ = int(delays[update["node"] - 1]), update["round"]
        late = round_ > delay or (startup == "initial" and round_ > 1)
        assert update["staleness"] == (min(delay, round_ - 1) if late else 0)
    rows = read_metrics(cfg.output_dir)
    assert rows[-1]["train/stale-updates"] == 3 and rows[-1]["train/staleness-max"] == 2
    assert rows[-1]["train/virtual-time"] == 5.0
    stale_in_round_2 = rows[2]["train/stale-updates"]
    assert stale_in_round_2 == (3 if startup == "initial" else 0)


def test_async_replacements_start_at_once_from_the_current_model(tiny_cfg):
    """Hand-worked FedBuff schedule: 4 in flight, buffer 2, every client 1 time unit.

    Round 1 applies two of the four first clients (t=1); the first arrival's slot is
    refilled at t=1 from model 1, the second's at the next round's start from model 2.
    Round 2 applies the other two first clients (staleness 1, t=1); round 3 the two
    replacements of round 1 (from models 1 and 2: staleness 2 and 1, t=2).
    """
    cfg = tiny_cfg("num_rounds=3", "strategy=fedbuff", "strategy.buffer_size=2",
                   "strategy.concurrency=4")
    run_experiment(cfg)
    got = [(u["round"], u["staleness"], u["time"]) for u in read_updates(cfg.output_dir)]
    assert got == [(1, 0, 1.0), (1, 0, 1.0), (2, 1, 1.0), (2, 1, 1.0), (3, 2, 2.0), (3, 1, 2.0)]


@pytest.mark.parametrize("strategy, expected_weight", [
    (["strategy=stale", "strategy.weighting=exponential", "strategy.half_life=2"],
     lambda tau: 2 ** (-tau / 2)),
    (["strategy=fedasync"], lambda tau: 1 / math.sqrt(1 + tau)),
    (["strategy=dc_asgd"], lambda tau: 1.0),
], ids=["exponential", "fedasync", "dc-asgd"])
def test_stale_runs_weight_every_update_by_its_staleness(tiny_cfg, strategy, expected_weight):
    cfg = tiny_cfg("num_rounds=4", "devices=fixed", "devices.delay=2", "devices.fraction=0.5",
                   *strategy)
    run_experiment(cfg)
    updates = read_updates(cfg.output_dir)
    assert any(u["staleness"] > 0 for u in updates)
    for update in updates:
        assert update["weight"] == pytest.approx(expected_weight(update["staleness"]))
    assert math.isfinite(read_metrics(cfg.output_dir)[-1]["server/accuracy"])


def test_async_buffer_applies_k_updates_per_round_in_clock_order(tiny_cfg):
    cfg = tiny_cfg("num_rounds=6", "strategy=fedbuff", "strategy.buffer_size=2",
                   "strategy.concurrency=4", "devices=fixed", "devices.delay=3",
                   "devices.fraction=0.5")
    run_experiment(cfg)
    updates = read_updates(cfg.output_dir)
    assert [sum(1 for u in updates if u["round"] == r) for r in range(1, 7)] == [2] * 6
    times = [u["time"] for u in updates]
    assert times == sorted(times)
    assert max(u["staleness"] for u in updates) > 0
    for update in updates:  # FedBuff's weighting 1 / sqrt(1 + staleness)
        assert update["weight"] == pytest.approx(1 / math.sqrt(1 + update["staleness"]))
    again = tiny_cfg("num_rounds=6", "strategy=fedbuff", "strategy.buffer_size=2",
                     "strategy.concurrency=4", "devices=fixed", "devices.delay=3",
                     "devices.fraction=0.5")
    run_experiment(again)
    assert read_updates(again.output_dir) == updates
    assert without_timing(read_metrics(again.output_dir)) == without_timing(
        read_metrics(cfg.output_dir))


def test_staleness_inversion_run_logs_conversions_and_reports_the_slow_class(tiny_cfg):
    cfg = tiny_cfg("num_rounds=4", "strategy=staleness_inversion", "devices=slow_class",
                   "devices.slow_class=1", "devices.delay=2", "devices.top_k=2",
                   "clients_per_round=6", "strategy.iterations=5", "strategy.dummy_size=8",
                   "strategy.oracle_metrics=true", *FULL_BATCH)
    run_experiment(cfg)
    stale = [u for u in read_updates(cfg.output_dir) if u["staleness"] > 0]
    assert stale and all(u["converted"] == 1.0 and u["inversion-seconds"] > 0 for u in stale)
    assert all("oracle-error-stale" in u and "oracle-error-inverted" in u for u in stale)
    rows = read_metrics(cfg.output_dir)
    assert "server/accuracy-class-1" in rows[-1]
    assert rows[-1]["train/inversion-seconds-mean"] > 0


def test_residual_fallback_keeps_the_fresh_update_only_while_drift_dominates(tiny_cfg):
    cfg = tiny_cfg("num_rounds=4", "strategy=staleness_inversion", "devices=fixed",
                   "devices.delay=2", "devices.fraction=0.5", "clients_per_round=6",
                   "strategy.iterations=5", "strategy.dummy_size=8", "strategy.fallback=residual",
                   *FULL_BATCH)
    run_experiment(cfg)
    stale = [u for u in read_updates(cfg.output_dir) if u["staleness"] > 0]
    assert stale
    for update in stale:
        expected = 1.0 if update["inversion-drift"] > update["inversion-residual"] else 0.0
        assert update["converted"] == expected
        assert update["conversion-seconds"] >= update["inversion-seconds"] > 0


def test_fallback_round_stops_converting_after_the_switch(tiny_cfg):
    cfg = tiny_cfg("num_rounds=4", "strategy=staleness_inversion", "devices=fixed",
                   "devices.delay=1", "devices.fraction=0.5", "clients_per_round=6",
                   "strategy.iterations=3", "strategy.dummy_size=4", "strategy.fallback=round",
                   "strategy.switch_round=2", *FULL_BATCH)
    run_experiment(cfg)
    for update in read_updates(cfg.output_dir):
        if update["staleness"] > 0:
            assert update["converted"] == (1.0 if update["round"] <= 2 else 0.0)
            assert ("inversion-seconds" in update) == (update["round"] <= 2)


INVERSION = "strategy=staleness_inversion"


@pytest.mark.parametrize("overrides, message", [
    (["devices=slow_class"], "strategy must be a strategy that applies stale updates"),
    (["strategy=fedbuff", "strategy.buffer_size=5"],
     r"strategy.buffer_size must be an integer in \[1, concurrency=3\]"),
    (["strategy=stale", "strategy.concurrency=9"],
     r"strategy.concurrency must be an integer in \[1, num_clients=6\]"),
    ([INVERSION, "client=finetune"], "client must be sgd for staleness_inversion"),
    ([INVERSION, "client.proximal_mu=0.1"], "client must be plain SGD"),
    ([INVERSION, "strategy.fallback=round"], "strategy.switch_round must be an integer"),
    ([INVERSION, "strategy.label_loss=mse"], "strategy.label_loss must be one of"),
    (["strategy=stale", "strategy.mode=semi"], "strategy.mode must be one of"),
    (["strategy=stale", "strategy.startup=late"], "strategy.startup must be one of"),
    (["strategy=stale", "devices=fixed", "backend=flower"],
     "backend must be inprocess or ray for simulated delays"),
    (["evaluation.classes=[-1]"], "evaluation.classes must be a list of class indices"),
    (["evaluation.classes=[10]"], r"evaluation.classes must be class indices in \[0, 9\]"),
    (["strategy=stale", "devices=random", "devices.distribution=lognormal", "devices.scale=0"],
     "devices.scale must be > 0 for a lognormal"),
    (["strategy=stale", "devices=fixed", "devices.fraction=2"], "devices.fraction must be"),
    (["strategy=stale", "strategy.hinge_at=-1"], "strategy.hinge_at must be a number >= 0"),
    ([INVERSION, "strategy.min_staleness=0"], "strategy.min_staleness must be an integer >= 1"),
])
def test_bad_staleness_settings_fail_before_any_work(tiny_cfg, overrides, message):
    cfg = tiny_cfg(*overrides)
    with pytest.raises(ConfigError, match=message):
        run_experiment(cfg)
    assert not (Path(cfg.output_dir) / "metrics.jsonl").exists()


def test_inversion_refuses_models_with_batch_normalization(tiny_cfg):
    from fedsim.spec import RunSpec

    cfg = tiny_cfg(INVERSION)
    with_norm = RunSpec(cfg, nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)), (2,), 3)
    with pytest.raises(ConfigError, match="cannot re-run clients of a model with batch norm"):
        StalenessInversion.check(with_norm)
    StalenessInversion.check(RunSpec(cfg, nn.Sequential(nn.Linear(2, 3)), (2,), 3))


def test_update_norm_is_l1():
    assert update_norm({"a": torch.tensor([1.0, -2.0]), "b": torch.tensor(3.0)}) == 6.0
