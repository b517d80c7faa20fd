"""FRL: supermask layers, the vote on hand-worked cases, the trainer, the strategy, the run."""

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

from fedsim.clients.frl import FRLTrainer, ranking, ranking_dtype, rankings
from fedsim.config import compose, validate
from fedsim.errors import ConfigError, MessageError
from fedsim.experiment import run_experiment
from fedsim.strategies.frl import FRL, borda_order, check_ranking, edge_positions, vote
from fedsim.supermask import (
    SupermaskCNN1D,
    SupermaskLayer,
    SupermaskMLP,
    conv8,
    kept_edges,
    lenet,
    set_mask_mode,
    top_mask,
)

# --- the vote --------------------------------------------------------------------------


def test_three_client_vote_hand_worked():
    rankings_ = np.array([[0, 1, 2, 3],   # positions of edges 0..3: 0 1 2 3
                          [1, 0, 2, 3],   # 1 0 2 3
                          [3, 2, 1, 0]])  # 3 2 1 0
    np.testing.assert_array_equal(edge_positions(rankings_), [[0, 1, 2, 3], [1, 0, 2, 3],
                                                              [3, 2, 1, 0]])
    # reputations 4 3 5 6: edge 1 is least voted, then 0, 2, 3
    np.testing.assert_array_equal(borda_order(rankings_), [1, 0, 2, 3])
    scores = np.array([0.3, -0.1, 0.5, -0.4], np.float32)
    np.testing.assert_array_equal(vote(rankings_, scores), np.float32([-0.1, -0.4, 0.3, 0.5]))


def test_equal_reputations_keep_edge_order():
    np.testing.assert_array_equal(borda_order(np.array([[0, 1, 2], [2, 1, 0]])), [0, 1, 2])


def test_vote_result_is_a_permutation_of_the_initial_scores_round_after_round():
    rng = np.random.default_rng(0)
    initial = rng.uniform(-1, 1, size=(4, 5)).astype(np.float32)
    scores = initial
    for _ in range(5):
        votes = np.stack([rng.permutation(20) for _ in range(7)]).astype(np.uint8)
        scores = vote(votes, scores)
        assert scores.shape == (4, 5) and scores.dtype == np.float32
        np.testing.assert_array_equal(np.sort(scores, axis=None), np.sort(initial, axis=None))


def test_unanimous_vote_orders_scores_as_the_clients_ranked():
    scores = np.array([0.5, -0.2, 0.9, 0.1])
    agreed = np.array([2, 0, 3, 1])  # edge 2 least important ... edge 1 most
    new = vote(np.stack([agreed] * 3), scores)
    np.testing.assert_array_equal(np.argsort(new), agreed)


def test_check_ranking_rejects_what_is_not_an_integer_permutation():
    check_ranking(1, "w", np.array([2, 0, 1], np.uint8), 3)
    with pytest.raises(MessageError, match=r"node 5: arrays\['w'\] must be an integer ranking"):
        check_ranking(5, "w", np.array([2.0, 0.0, 1.0]), 3)
    with pytest.raises(MessageError, match=r"must have shape \(3,\)"):
        check_ranking(5, "w", np.array([0, 1], np.uint8), 3)
    with pytest.raises(MessageError, match="every edge id 0..2 exactly once"):
        check_ranking(5, "w", np.array([0, 0, 1], np.uint8), 3)
    with pytest.raises(MessageError, match="every edge id 0..2 exactly once"):
        check_ranking(5, "w", np.array([0, 1, 7], np.int64), 3)


# --- the strategy ----------------------------------------------------------------------


def _instruction(node_id: int) -> Message:
    msg = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = f"m{node_id}"
    return msg


def _reply(node_id: int, arrays: dict[str, np.ndarray]) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": 10, "train_loss": 1.0}),
    })
    reply = Message(content, reply_to=_instruction(node_id))
    reply.metadata.__dict__["_src_node_id"] = node_id
    return reply


def test_strategy_votes_each_layer_and_rejects_bad_replies():
    strategy = FRL()
    strategy.current_arrays = {"a": np.array([0.3, -0.1, 0.5, -0.4], np.float32),
                               "b": np.array([[1.0, 2.0]], np.float32)}
    replies = [_reply(n, {"a": np.array(r, np.uint8), "b": np.array([0, 1], np.uint8)})
               for n, r in ((3, [3, 2, 1, 0]), (1, [0, 1, 2, 3]), (2, [1, 0, 2, 3]))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_array_equal(arrays["a"].numpy(), np.float32([-0.1, -0.4, 0.3, 0.5]))
    np.testing.assert_array_equal(arrays["b"].numpy(), [[1.0, 2.0]])
    assert metrics["median-crossings"] == pytest.approx(2 / 6)  # edges 0 and 3 crossed
    floats = _reply(4, {"a": np.arange(4.0), "b": np.array([0, 1], np.uint8)})
    with pytest.raises(MessageError, match=r"node 4: arrays\['a'\] must be an integer ranking"):
        strategy.aggregate_train(1, [floats])
    with pytest.raises(MessageError, match="node 4: arrays must rank exactly"):
        strategy.aggregate_train(1, [_reply(4, {"a": np.arange(4, dtype=np.uint8)})])


def test_strategy_sends_the_mask_mode_to_clients():
    class Nodes:
        def get_node_ids(self):
            return [1, 2]

    strategy = FRL(mask_mode="topk", fraction_train=1.0, min_train_nodes=2,
                   min_available_nodes=2)
    arrays = ArrayRecord({"a": Array(np.zeros(3, np.float32))})
    for configure in (strategy.configure_train, strategy.configure_evaluate):
        messages = list(configure(1, arrays, ConfigRecord(), Nodes()))
        assert {m.content["config"]["mask-mode"] for m in messages} == {"topk"}
    with pytest.raises(ValueError, match="mask_mode must be one of"):
        FRL(mask_mode="bottom")


# --- supermask layers ------------------------------------------------------------------


def test_top_mask_keeps_the_largest_entries_and_breaks_ties_by_position():
    mask = top_mask(torch.tensor([0.2, -0.9, 0.5, 0.1]), 2)
    assert mask.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert top_mask(torch.tensor([1.0, 1.0, 1.0, 1.0]), 2).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert kept_edges(5, 0.5) == 3  # the reference zeroes int(0.5 * 5) = 2 edges


def test_layer_masks_by_magnitude_or_by_signed_score():
    layer = SupermaskLayer((1, 4), torch.nn.functional.linear, torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.scores.copy_(torch.tensor([[-0.9, 0.1, 0.8, -0.2]]))
    assert layer.mask().tolist() == [[1.0, 0.0, 1.0, 0.0]]  # |score|: both ends
    layer.mask_mode = "topk"
    assert layer.mask().tolist() == [[0.0, 1.0, 1.0, 0.0]]  # signed: the top half


def test_gradient_reaches_the_scores_straight_through_and_weights_stay_frozen():
    layer = SupermaskLayer((1, 4), torch.nn.functional.linear, torch.Generator().manual_seed(0),
                           mask_mode="topk")
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    layer(x).sum().backward()
    # d out / d mask_j = weight_j * x_j, passed unchanged to score j, masked or not
    torch.testing.assert_close(layer.scores.grad, layer.weight * x)
    assert [name for name, _ in layer.named_parameters()] == ["scores"]
    assert list(layer.state_dict()) == ["scores"]  # weights never travel


def test_every_party_builds_the_same_network_from_the_seed():
    torch.manual_seed(123)
    a = SupermaskMLP([40], 10, seed=7)
    torch.manual_seed(456)
    b = SupermaskMLP([40], 10, seed=7)
    c = SupermaskMLP([40], 10, seed=8)
    for la, lb, lc in zip(a.net[1::2], b.net[1::2], c.net[1::2], strict=True):
        assert torch.equal(la.weight, lb.weight) and torch.equal(la.scores, lb.scores)
        assert not torch.equal(la.weight, lc.weight)
    first = a.net[1]
    fan_in = first.weight.shape[1]
    assert first.weight.abs().unique().tolist() == pytest.approx([math.sqrt(2 / fan_in)])
    assert 0.4 < (first.weight > 0).float().mean() < 0.6  # random signs
    assert first.scores.abs().max() <= 1 / math.sqrt(fan_in)


@pytest.mark.parametrize("build, shape", [
    (lambda: SupermaskMLP([40], 10), (40,)),
    (lambda: SupermaskCNN1D([40], 10), (40,)),
    (lambda: lenet([1, 28, 28], 10), (1, 28, 28)),
    (lambda: lenet([1, 8, 8], 10), (1, 8, 8)),
    (lambda: conv8([3, 32, 32], 10), (3, 32, 32)),
])
def test_supermask_models_give_logits_and_carry_only_scores(build, shape):
    model = build()
    assert model(torch.zeros(2, *shape)).shape == (2, 10)
    assert all(key.endswith("scores") for key in model.state_dict())


def test_lenet_has_the_reference_layer_sizes():
    sizes = [v.shape for v in lenet([1, 28, 28], 10).state_dict().values()]
    assert sizes == [(32, 1, 3, 3), (64, 32, 3, 3), (128, 12544), (10, 128)]


# --- the trainer -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def client_data():
    from fedsim.datasets.federated import build_federated_data

    return build_federated_data(compose(TINY)).client(0)


def _frl_trainer(**kwargs) -> FRLTrainer:
    return FRLTrainer(lambda: SupermaskMLP([40], 10, hidden=[16], seed=3), device="cpu",
                      **kwargs)


def test_ranking_dtype_and_values():
    assert ranking_dtype(256) == np.uint8 and ranking_dtype(257) == np.uint16
    assert ranking_dtype(70000) == np.uint32
    np.testing.assert_array_equal(ranking(torch.tensor([0.5, -1.0, 0.5, 0.0])), [1, 3, 0, 2])


def test_trainer_uploads_integer_rankings_of_its_trained_scores(client_data):
    trainer = _frl_trainer()
    start = ArrayRecord(SupermaskMLP([40], 10, hidden=[16], seed=3).state_dict())
    out = trainer.train(start, ConfigRecord({"server-round": 1}), client_data, RecordDict())
    assert out.arrays.keys() == start.keys()
    for _key, array in out.arrays.items():
        upload = array.numpy()
        assert upload.dtype == ranking_dtype(upload.size)  # uint16 for 640 edges, uint8 for 160
        assert sorted(upload.tolist()) == list(range(upload.size))
    np.testing.assert_array_equal(out.arrays["net.1.scores"].numpy(),
                                  rankings(trainer._model)["net.1.scores"].numpy())
    moved = out.arrays["net.1.scores"].numpy() != ranking(start.to_torch_state_dict()
                                                          ["net.1.scores"])
    assert moved.any()  # training changed the ranking
    assert out.metrics["num-examples"] == client_data.num_train


def test_trainer_round_decay_equals_a_smaller_learning_rate(client_data):
    start = ArrayRecord(SupermaskMLP([40], 10, hidden=[16], seed=3).state_dict())
    config = ConfigRecord({"server-round": 3})
    decayed = _frl_trainer(lr=0.4, lr_decay=0.5).train(start, config, client_data, RecordDict())
    smaller = _frl_trainer(lr=0.1, lr_decay=1.0).train(start, config, client_data, RecordDict())
    for key in start:
        np.testing.assert_array_equal(decayed.arrays[key].numpy(), smaller.arrays[key].numpy())


def test_trainer_applies_the_mask_mode_the_server_sends(client_data):
    trainer = _frl_trainer()
    start = ArrayRecord(SupermaskMLP([40], 10, hidden=[16], seed=3).state_dict())
    trainer.evaluate(start, ConfigRecord({"mask-mode": "topk"}), client_data, RecordDict())
    assert {m.mask_mode for m in trainer._model.modules() if isinstance(m, SupermaskLayer)} == {
        "topk"}
    set_mask_mode(trainer._model, "reference")
    with pytest.raises(ValueError, match="mask-mode must be one of"):
        trainer.train(start, ConfigRecord({"mask-mode": "x"}), client_data, RecordDict())


# --- config and runs -------------------------------------------------------------------


def test_config_pairs_frl_with_its_client_and_checks_the_mask_mode(tiny_cfg):
    from fedsim.runtime import preflight

    with pytest.raises(ConfigError, match="client must be a trainer that uploads rankings"):
        validate(compose(["strategy=frl", "model=supermask_mlp"]))
    with pytest.raises(ConfigError, match="client must be a trainer that uploads weights"):
        validate(compose(["client=frl", "model=supermask_mlp"]))
    # the mask mode is the strategy's: checked by its constructor and its check(spec)
    with pytest.raises(ConfigError, match="strategy.mask_mode must be one of"):
        preflight(tiny_cfg("strategy=frl", "client=frl", "model=supermask_mlp",
                           "strategy.mask_mode=bottom"))
    with pytest.raises(ConfigError, match=r"model.mask_mode must be the strategy's \(reference\)"):
        preflight(tiny_cfg("strategy=frl", "client=frl", "model=supermask_mlp",
                           "model.mask_mode=topk"))
    cfg = compose(["strategy=frl", "client=frl", "model=supermask_mlp",
                   "strategy.mask_mode=topk"])
    assert cfg.model.mask_mode == "topk"  # the server's evaluation model follows the strategy
    assert compose(["model=supermask_mlp"]).model.mask_mode == "reference"


def test_frl_refuses_a_dense_model(tiny_cfg):
    from fedsim.runtime import preflight

    with pytest.raises(ConfigError, match="model must be a supermask network"):
        preflight(tiny_cfg("strategy=frl", "client=frl", "model=mlp"))


@pytest.mark.parametrize("mask_mode", ["reference", "topk"])
def test_frl_preset_runs_learns_and_uploads_less_than_fedavg(tmp_path, mask_mode):
    common = [*TINY, "dataset=digits", "num_rounds=12", "num_clients=6", "clients_per_round=6",
              "evaluation.clients_per_round=0", "partition.alpha=100"]
    frl = compose(["+experiment=frl_mnist1d", *common, "model=supermask_mlp",
                   f"strategy.mask_mode={mask_mode}", f"output_dir={tmp_path / 'frl'}"])
    run_experiment(frl)
    rows = read_metrics(tmp_path / "frl")
    assert len(rows) == 13 and all(r.get("train_failures", 0) == 0 for r in rows)
    assert rows[-1]["server/accuracy"] > rows[0]["server/accuracy"] + 0.2
    fedavg = compose([*common, "model=mlp", "num_rounds=1", f"output_dir={tmp_path / 'avg'}"])
    run_experiment(fedavg)
    avg_up = read_metrics(tmp_path / "avg")[1]["bytes_up"]
    # uint16 rankings of the 64*100 + 100*100 + 100*10 edges vs float32 weights and biases
    assert rows[1]["bytes_up"] < 0.55 * avg_up
