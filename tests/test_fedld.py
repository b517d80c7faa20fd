"""FedLD: the aggregation math on hand-worked cases, the strategy, the trainer, the run."""

import math

import numpy as np
import pytest
import torch
from conftest import TINY, read_metrics
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.app import Error as MessageErrorRecord

from fedsim.clients.fedld import FedLDTrainer, margin_loss, margin_penalty
from fedsim.clients.sgd import SGDTrainer
from fedsim.config import compose, validate
from fedsim.errors import ConfigError, DataError, MessageError
from fedsim.experiment import run_experiment
from fedsim.models import MLP
from fedsim.strategies.base import apply_update, global_cosine, stack_deltas
from fedsim.strategies.fedld import (
    FedLD,
    gram_eigen,
    majority_sign_flips,
    num_directions,
    principal_gradient_update,
    with_norm,
)


@pytest.fixture(scope="module")
def tiny_data():
    from fedsim.datasets.federated import build_federated_data

    return build_federated_data(compose(TINY))


def literal_fedld(deltas: np.ndarray, k_proportion: float = 0.8) -> np.ndarray:
    """The spec's formula written as loops, one projection at a time (no guards)."""
    m = len(deltas)
    eigenvalues, eigenvectors = np.linalg.eigh(deltas @ deltas.T / m)
    order = np.argsort(eigenvalues)[::-1]
    s, e = eigenvalues[order], eigenvectors[:, order]
    k = int(k_proportion * m)
    revised = []
    for d in deltas:
        r = np.zeros_like(d)
        for j in range(k):
            w = deltas.T @ e[:, j]
            projection = (d @ w) / (w @ w) * w
            r += projection * s[j] / s.sum() * np.linalg.norm(d) / np.linalg.norm(projection)
        revised.append(r)
    return np.mean(revised, axis=0)


# --- the pure math ---------------------------------------------------------------------


def test_identical_deltas_give_that_delta_back():
    # G = [d; d; d]: s = (|d|^2, 0, 0), one usable direction along d with share 1,
    # so every r_i = 1 * |d| * d/|d| = d and the mean is d.
    d = np.array([3.0, -4.0, 1.0])
    update = principal_gradient_update(np.stack([d, d, d]))
    np.testing.assert_allclose(update, d, atol=1e-12)


def test_orthogonal_clients_hand_worked():
    # d1 = (3, 0), d2 = (0, 4): G G^T / 2 = diag(4.5, 8), total 12.5.
    deltas = np.array([[3.0, 0.0], [0.0, 4.0]])
    # k = floor(0.8 * 2) = 1: only w1 ~ (0, 1). <d1, w1> = 0 -> r1 = 0;
    # r2 = (8 / 12.5) * 4 * (0, 1) = (0, 2.56); mean = (0, 1.28).
    np.testing.assert_allclose(principal_gradient_update(deltas), [0.0, 1.28], atol=1e-12)
    # k = 2 adds w2 ~ (1, 0): r1 = (4.5 / 12.5) * 3 * (1, 0) = (1.08, 0); mean = (0.54, 1.28).
    np.testing.assert_allclose(
        principal_gradient_update(deltas, k_proportion=1.0), [0.54, 1.28], atol=1e-12
    )


def test_opposite_sign_clients():
    # Collinear, opposite: rank 1, so r_i = sign(<d_i, u>) |d_i| u = d_i and the update is
    # the plain mean: (2, 0) and (-1, 0) -> (0.5, 0); equal and opposite cancel exactly.
    np.testing.assert_allclose(
        principal_gradient_update(np.array([[2.0, 0.0], [-1.0, 0.0]])), [0.5, 0.0], atol=1e-12
    )
    np.testing.assert_allclose(
        principal_gradient_update(np.array([[1.0, 1.0], [-1.0, -1.0]])), [0.0, 0.0], atol=1e-12
    )


def test_rank_deficient_layer_is_finite_and_skips_null_directions():
    # A 2-element bias from 5 clients: rank <= 2 but k = 4 directions are asked for.
    rng = np.random.default_rng(0)
    deltas = rng.normal(size=(5, 2))
    update = principal_gradient_update(deltas)
    assert np.all(np.isfinite(update))
    # Only the two real directions contribute: same as asking for exactly two.
    np.testing.assert_allclose(update, principal_gradient_update(deltas, 0.4), atol=1e-12)
    np.testing.assert_allclose(update, literal_fedld(deltas, 0.4), atol=1e-12)
    # Rank 1 with k = 4: the mean, not NaN.
    collinear = np.outer([1.0, -2.0, 0.5, 3.0, 0.0], [0.6, 0.8])
    np.testing.assert_allclose(
        principal_gradient_update(collinear), collinear.mean(axis=0), atol=1e-12
    )


def test_zero_deltas_and_zero_clients_never_give_nan():
    np.testing.assert_array_equal(principal_gradient_update(np.zeros((4, 6))), np.zeros(6))
    deltas = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [2.0, 4.0, 0.0]])
    update = principal_gradient_update(deltas)
    np.testing.assert_allclose(update, deltas.mean(axis=0), atol=1e-12)  # rank 1 again


def test_matches_the_literal_formula_on_random_deltas():
    rng = np.random.default_rng(1)
    deltas = rng.normal(size=(10, 40)) + 2.0 * rng.normal(size=40)
    np.testing.assert_allclose(
        principal_gradient_update(deltas), literal_fedld(deltas), rtol=1e-10, atol=1e-12
    )


def test_eigenvalues_are_squared_singular_values_over_m():
    rng = np.random.default_rng(2)
    deltas = rng.normal(size=(4, 9))
    eigenvalues, eigenvectors = gram_eigen(deltas @ deltas.T, 4)
    singular = np.linalg.svd(deltas, compute_uv=False)
    np.testing.assert_allclose(eigenvalues, singular**2 / 4, rtol=1e-10)
    directions = eigenvectors.T @ deltas
    np.testing.assert_allclose(
        np.linalg.norm(directions, axis=1), np.sqrt(4 * eigenvalues), rtol=1e-8
    )


def test_sign_calibration_by_majority_and_ties():
    projections = np.array([[1.0, -1.0, 0.5], [-1.0, -1.0, -0.5], [0.0, 1.0, 2.0]])
    # column 0: two >= 0 (1, 0) vs one < 0 -> keep; column 1: one vs two -> flip;
    # column 2: two vs one -> keep.
    np.testing.assert_array_equal(majority_sign_flips(projections), [False, True, False])
    np.testing.assert_array_equal(majority_sign_flips(np.array([[1.0], [-1.0]])), [False])
    np.testing.assert_array_equal(majority_sign_flips(np.array([[0.0], [-1.0]])), [False])


def test_update_is_odd_and_invariant_to_client_order():
    rng = np.random.default_rng(3)
    deltas = rng.normal(size=(7, 30)) + rng.normal(size=30)
    update = principal_gradient_update(deltas)
    np.testing.assert_allclose(principal_gradient_update(-deltas), -update, atol=1e-12)
    for _ in range(3):
        np.testing.assert_allclose(
            principal_gradient_update(deltas[rng.permutation(7)]), update, atol=1e-12
        )


def test_number_of_directions():
    assert [num_directions(m, 0.8) for m in (1, 2, 5, 10, 12)] == [1, 1, 4, 8, 9]
    assert num_directions(90, 0.7) == 63  # 0.7 * 90 is 62.99999... in floating point


def test_projections_at_rounding_level_have_no_sign():
    # As the hand-worked orthogonal case, with d1 tilted by 1e-15 towards w1: a sign
    # that rounding could flip counts as 0, so the update stays (0, 1.28) ...
    tilted = np.array([[3.0, 3e-15], [0.0, 4.0]])
    np.testing.assert_allclose(principal_gradient_update(tilted), [0.0, 1.28], atol=1e-9)
    # ... while a real (if small) projection counts: r1 = 0.64 * 3 * (0, 1) joins r2.
    small = np.array([[3.0, 3e-6], [0.0, 4.0]])
    np.testing.assert_allclose(principal_gradient_update(small), [0.0, 2.24], atol=1e-5)


# --- the strategy ----------------------------------------------------------------------


def test_strategy_branches_and_history():
    strategy = FedLD()
    rng = np.random.default_rng(4)
    deltas = {
        "w": rng.normal(size=(3, 2, 4)) + 1.0,
        "b": rng.normal(size=(3, 1)),
        "frozen": np.zeros((3, 5)),
    }
    first = strategy.aggregate_deltas(1, deltas)
    for key, stacked in deltas.items():  # round 1: plain mean, history = 0.01 * mean
        np.testing.assert_allclose(first[key], stacked.mean(axis=0))
        np.testing.assert_allclose(strategy.history[key], 0.01 * stacked.mean(axis=0))
    second = strategy.aggregate_deltas(2, deltas)
    expected_w = principal_gradient_update(deltas["w"].reshape(3, -1)).reshape(2, 4)
    np.testing.assert_allclose(second["w"], expected_w)
    np.testing.assert_allclose(second["b"], deltas["b"].mean(axis=0))  # single element
    np.testing.assert_array_equal(second["frozen"], np.zeros(5))  # zero history -> mean
    np.testing.assert_allclose(
        strategy.history["w"], 0.99 * 0.01 * deltas["w"].mean(axis=0) + 0.01 * expected_w
    )


def test_a_layer_with_zero_history_takes_the_mean_until_it_moves():
    strategy = FedLD()
    still = {"w": np.zeros((3, 4))}
    strategy.aggregate_deltas(1, still)
    moving = {"w": np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 1.0]])}
    second = strategy.aggregate_deltas(2, moving)  # history still all zeros: the mean
    np.testing.assert_allclose(second["w"], moving["w"].mean(axis=0))
    third = strategy.aggregate_deltas(3, moving)  # now it has a history: the rule
    np.testing.assert_allclose(third["w"], principal_gradient_update(moving["w"]))
    assert not np.allclose(third["w"], second["w"])


def test_ablation_without_the_server_rule_always_takes_the_mean():
    strategy = FedLD(principal_gradient=False)
    deltas = {"w": np.random.default_rng(5).normal(size=(4, 6)) + 1.0}
    for server_round in (1, 2, 3):
        update = strategy.aggregate_deltas(server_round, deltas)
        np.testing.assert_allclose(update["w"], deltas["w"].mean(axis=0))


def test_ablation_at_the_mean_length_keeps_the_direction_and_the_mean_norm():
    """Two clients with orthogonal unit deltas e1, e2 in round 2 (history set): the rule
    gives some update u; the mean (e1 + e2) / 2 has norm 1/sqrt(2), so the ablation
    returns u scaled to that norm, in u's direction."""
    deltas = {"w": np.array([[1.0, 0.0], [0.0, 1.0]])}
    plain, rescaled = FedLD(), FedLD(match_mean_norm=True)
    for strategy in (plain, rescaled):
        strategy.history = {"w": np.ones(2)}
    u = plain.aggregate_deltas(2, deltas)["w"]
    v = rescaled.aggregate_deltas(2, deltas)["w"]
    assert np.linalg.norm(v) == pytest.approx(1 / math.sqrt(2))
    assert global_cosine({"w": u}, {"w": v}) == pytest.approx(1.0)
    assert with_norm({"w": np.zeros(3)}, 2.0)["w"].tolist() == [0.0, 0.0, 0.0]


def test_global_cosine_by_hand():
    """a = (1, 0 | 2), b = (1, 1 | 0): a.b = 1, |a| = sqrt(5), |b| = sqrt(2)."""
    a = {"x": np.array([1.0, 0.0]), "y": np.array(2.0)}
    b = {"x": np.array([1.0, 1.0]), "y": np.array(0.0)}
    assert global_cosine(a, b) == pytest.approx(1 / math.sqrt(10))
    assert global_cosine(a, {"x": np.zeros(2), "y": np.array(0.0)}) == 0.0


def _instruction(node_id: int) -> Message:
    return Message(content=RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)


def _reply(node_id: int, arrays: dict[str, np.ndarray], num_examples: int = 10) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": num_examples, "train_loss": 1.0}),
    })
    return Message(content=content, reply_to=_instruction(node_id))


def _failed(node_id: int) -> Message:
    error = MessageErrorRecord(code=1, reason="client crashed")
    return Message(error, reply_to=_instruction(node_id))


def _configured(strategy: FedLD, weights: dict[str, np.ndarray]) -> None:
    strategy.current_arrays = {k: v.copy() for k, v in weights.items()}


def test_aggregate_train_applies_the_update_over_the_clients_that_replied():
    weights = {"w": np.ones((2, 3), np.float32), "steps": np.array(5, np.int64)}
    strategy = FedLD()
    _configured(strategy, weights)
    d1 = {"w": np.full((2, 3), 0.5, np.float32), "steps": np.array(3, np.int64)}
    d2 = {"w": np.full((2, 3), 0.25, np.float32), "steps": np.array(4, np.int64)}
    arrays, metrics = strategy.aggregate_train(1, [_reply(1, d1), _failed(2), _reply(3, d2)])
    new = arrays.to_numpy_ndarrays()
    np.testing.assert_allclose(new[0], np.full((2, 3), 1.375))  # unweighted mean of 2 repliers
    assert new[0].dtype == np.float32 and new[1].dtype == np.int64 and int(new[1]) == 9
    assert metrics["train_loss"] == pytest.approx(1.0)
    assert metrics["update-norm"] == pytest.approx(math.sqrt(6 * 0.375**2 + 3.5**2))
    assert metrics["update-cosine"] == pytest.approx(1.0)  # round 1 takes the mean itself


def test_aggregate_train_rejects_a_reply_that_does_not_match_the_model():
    strategy = FedLD()
    _configured(strategy, {"w": np.zeros((2, 3), np.float32)})
    with pytest.raises(MessageError, match=r"node 4: arrays\['w'\] must have shape \(2, 3\)"):
        strategy.aggregate_train(1, [_reply(4, {"w": np.zeros((3, 2), np.float32)})])
    with pytest.raises(MessageError, match=r"node 4: .*missing \['w'\], unexpected \['v'\]"):
        stack_deltas([(4, ArrayRecord({"v": Array(np.zeros(1))}))], {"w": np.zeros(1)})


def test_apply_update_rounds_integer_entries_and_keeps_variances_nonnegative():
    new = apply_update({"n": np.array(2, np.int64)}, {"n": np.array(2.6)})
    assert new["n"].numpy().dtype == np.int64 and int(new["n"].numpy()) == 5
    current = {"bn.running_var": np.array([0.5, 1.0], np.float32),
               "bn.running_mean": np.array([0.5, 1.0], np.float32)}
    step = {"bn.running_var": np.array([-0.75, 0.5]), "bn.running_mean": np.array([-0.75, 0.5])}
    new = apply_update(current, step)
    np.testing.assert_array_equal(new["bn.running_var"].numpy(), [0.0, 1.5])
    np.testing.assert_array_equal(new["bn.running_mean"].numpy(), [-0.25, 1.5])


def test_replies_are_aggregated_in_node_order_whatever_their_arrival():
    # Equal eigenvalues: the eigenvector basis, hence the result, depends on row order.
    weights = {"w": np.zeros(3, np.float64)}
    replies = [_reply(2, {"w": np.array([1.0, 0.0, 0.0])}),
               _reply(1, {"w": np.array([0.0, 1.0, 0.0])})]
    results = []
    for order in (replies, replies[::-1]):
        strategy = FedLD(k_proportion=0.5)
        strategy.history = {"w": np.ones(3)}
        _configured(strategy, weights)
        arrays, _ = strategy.aggregate_train(2, order)
        results.append(arrays["w"].numpy())
    np.testing.assert_array_equal(results[0], results[1])


def test_non_finite_or_mistyped_uploads_are_rejected():
    reference = {"w": np.zeros(2, np.float32)}
    bad_value = ArrayRecord({"w": Array(np.array([1.0, np.nan], np.float32))})
    with pytest.raises(MessageError, match=r"node 3: arrays\['w'\] must be finite"):
        stack_deltas([(3, bad_value)], reference)
    bad_dtype = ArrayRecord({"w": Array(np.zeros(2, np.int64))})
    with pytest.raises(MessageError, match=r"node 3: arrays\['w'\] must have a 'f'-kind dtype"):
        stack_deltas([(3, bad_dtype)], reference)


def test_invalid_strategy_parameters_are_refused():
    with pytest.raises(ValueError, match="k_proportion"):
        FedLD(k_proportion=0.0)
    with pytest.raises(ValueError, match="history_decay"):
        FedLD(history_decay=1.0)
    with pytest.raises(ValueError, match="strategy.match_mean_norm must be true or false"):
        FedLD(match_mean_norm="yes")


# --- the trainer -----------------------------------------------------------------------


def test_margin_penalty_hand_worked():
    # Uniform 2-class predictions for 2 samples: ||P||_F^2 = 4 * 0.25 = 1 -> log 2.
    logits = torch.zeros(2, 2)
    assert margin_penalty(logits).item() == pytest.approx(math.log(2))
    assert margin_loss(logits, torch.tensor([0, 1]), 0.5).item() == pytest.approx(1.5 * math.log(2))
    # Confident one-hot predictions for 3 samples: ||P||_F^2 -> 3 -> log 4.
    assert margin_penalty(torch.tensor([[50.0, 0.0]] * 3)).item() == pytest.approx(math.log(4))


def _client_data(tiny_data):
    return tiny_data.client(0)


def _trainer(cls, **kwargs):
    torch.manual_seed(0)
    return cls(lambda: MLP(input_shape=[40], num_classes=10, hidden=[16]), seed=0, lr=0.1,
               momentum=0.0, local_epochs=1, batch_size=16, device="cpu", **kwargs)


def test_trainer_uploads_deltas_that_reproduce_plain_sgd_when_lam_is_zero(tiny_data):
    data = _client_data(tiny_data)
    torch.manual_seed(0)
    start = ArrayRecord(MLP(input_shape=[40], num_classes=10, hidden=[16]).state_dict())
    config = ConfigRecord({"server-round": 1})
    sgd = _trainer(SGDTrainer).train(start, config, data, RecordDict())
    fedld = _trainer(FedLDTrainer, lam=0.0).train(start, config, data, RecordDict())
    global_state = start.to_torch_state_dict()
    for key, weights in sgd.arrays.to_torch_state_dict().items():
        delta = fedld.arrays.to_torch_state_dict()[key]
        torch.testing.assert_close(global_state[key] + delta, weights, rtol=0, atol=1e-6)
    margin = _trainer(FedLDTrainer, lam=1.0).train(start, config, data, RecordDict())
    assert any(
        not torch.equal(a, b)
        for a, b in zip(margin.arrays.to_torch_state_dict().values(),
                        fedld.arrays.to_torch_state_dict().values(), strict=True)
    )


def test_trainer_uploads_zero_deltas_with_zero_lr(tiny_data):
    torch.manual_seed(0)
    start = ArrayRecord(MLP(input_shape=[40], num_classes=10, hidden=[16]).state_dict())
    trainer = FedLDTrainer(lambda: MLP(input_shape=[40], num_classes=10, hidden=[16]), lr=0.0,
                           momentum=0.0, local_epochs=1, device="cpu")
    out = trainer.train(start, ConfigRecord({"server-round": 1}), _client_data(tiny_data),
                        RecordDict())
    assert out.arrays.keys() == start.keys()
    assert all(not v.any() for v in out.arrays.to_torch_state_dict().values())


# --- config and runs -------------------------------------------------------------------


def test_config_refuses_mismatched_uploads(tiny_cfg):
    from fedsim.runtime import preflight

    with pytest.raises(ConfigError, match="client must be a trainer that uploads deltas"):
        validate(compose(["strategy=fedld"]))
    with pytest.raises(ConfigError, match="client must be a trainer that uploads weights"):
        validate(compose(["client=fedld"]))
    # the strategy's and the trainer's own constructors, built once in preflight
    with pytest.raises(ConfigError, match=r"strategy.k_proportion must be a number in \(0, 1\]"):
        preflight(tiny_cfg("strategy=fedld", "client=fedld", "strategy.k_proportion=1.5"))
    with pytest.raises(ConfigError, match="client.lam must be a number >= 0"):
        preflight(tiny_cfg("strategy=fedld", "client=fedld", "client.lam=-1"))


def test_fedld_preset_runs_and_learns(tmp_path):
    cfg = compose(["+experiment=fedld_mnist1d", *TINY, "num_rounds=8", "clients_per_round=3",
                   "client.momentum=0.9", "client.lr=0.1", f"output_dir={tmp_path}"])
    assert cfg.strategy._target_.endswith("FedLD") and cfg.client._target_.endswith("Trainer")
    summary = run_experiment(cfg)
    rows = read_metrics(tmp_path)
    assert len(rows) == 9
    assert all(math.isfinite(r["train/update-norm"]) for r in rows[1:])
    assert rows[-1]["server/accuracy"] > rows[0]["server/accuracy"] + 0.1
    assert summary["final"]["server/accuracy"] == rows[-1]["server/accuracy"]


def test_fedld_with_batchnorm_buffers_runs_end_to_end(tmp_path):
    # BatchNorm adds running statistics and an int64 step counter to the deltas.
    cfg = compose(["+experiment=fedld_mnist1d", *TINY, "dataset=digits", "model=resnet18",
                   "model.width=8", "num_rounds=3", f"output_dir={tmp_path}"])
    run_experiment(cfg)
    rows = read_metrics(tmp_path)
    assert len(rows) == 4 and rows[-1]["train_failures"] == 0
    assert all(math.isfinite(r["server/loss"]) for r in rows)
    assert rows[2]["train/update-norm"] != rows[2]["train/mean-delta-norm"]  # the rule ran


def test_a_lone_replier_moves_the_model_by_its_own_delta():
    delta = np.array([[0.5, -1.0, 2.0]])
    np.testing.assert_allclose(principal_gradient_update(delta), delta[0], atol=1e-12)


def test_fedld_cifar10_preset_fails_clearly_without_network(tmp_path, monkeypatch):
    from fedsim.datasets import hf

    monkeypatch.setattr(hf, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-cache"))  # no cached copy either
    cfg = compose(["+experiment=fedld_cifar10", f"output_dir={tmp_path / 'run'}"])
    assert cfg.model._target_ == "fedsim.models.resnet18"
    assert cfg.dataset.repo == "uoft-cs/cifar10"
    with pytest.raises(DataError, match="needs a network on first use; offline, use dataset="):
        run_experiment(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
