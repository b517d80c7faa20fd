"""FedLoGe: class groups, SSE-C, GLA-FR, the trainer's heads and state, end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_metrics
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsim.clients.fedloge import (
    LOCAL_HEAD,
    FedLoGeTrainer,
    norm_transfer,
    personalized_logits,
)
from fedsim.clients.finetune import FineTuneTrainer
from fedsim.datasets.federated import ClientData
from fedsim.datasets.partition import class_groups, long_tail_counts
from fedsim.errors import ConfigError
from fedsim.etf import dense_etf, nearest_cosines, sparse_etf
from fedsim.experiment import run_experiment
from fedsim.metrics import (
    aggregate_client_evaluations,
    classification_metrics,
    mask_absent_classes,
    measured,
)
from fedsim.models import MLP, classifier_layer, features
from fedsim.strategies.fedloge import FedLoGe, classifier_key, realign_rows

LONG_TAIL = ["data.imbalance_factor=0.1", "partition=dirichlet", "partition.alpha=1.0"]
FEDLOGE = ["strategy=fedloge", "client=fedloge", "client.etf_steps=200", *LONG_TAIL]


# --- class groups and metrics ------------------------------------------------------------

def test_class_groups_follow_the_75_95_cumulative_split():
    counts = long_tail_counts(np.full(10, 400), 0.01)  # 400 239 143 86 51 30 18 11 6 4
    # cumulative share before each class: 0, .40, .64 | .79, .88, .93 | .96, .98, .99, 1.0
    assert class_groups(counts).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    # sorted by count (ties by id); the class crossing 75% is still head; 95% before -> tail
    assert class_groups(np.array([5, 70, 20, 5])).tolist() == [1, 0, 0, 2]
    assert class_groups(np.array([50, 50])).tolist() == [0, 0]


def test_classification_metrics_split_by_group_and_keep_every_key():
    logits = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [2.0, 0, 0], [0, 0, 2.0]])
    labels = torch.tensor([0, 1, 2, 2])  # right, right, wrong, right
    groups = np.array([0, 1, 2])
    m = classification_metrics(logits, labels, groups)
    assert m["accuracy"] == 0.75 and m["num-examples"] == 4
    assert (m["accuracy-head"], m["accuracy-middle"], m["accuracy-tail"]) == (1.0, 1.0, 0.5)
    assert (m["num-examples-head"], m["num-examples-tail"]) == (1, 2)
    empty = classification_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), groups)
    assert set(empty) == set(m) and empty["accuracy-tail"] == 0 and empty["num-examples"] == 0


def test_measured_metrics_drop_counts_and_empty_groups():
    m = {"loss": 1.0, "accuracy": 0.5, "num-examples": 4, "accuracy-head": 0.5,
         "num-examples-head": 4, "accuracy-tail": 0.0, "num-examples-tail": 0}
    assert measured(m) == {"loss": 1.0, "accuracy": 0.5, "accuracy-head": 0.5}


def _reply(**metrics) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(metrics)})


def test_client_evaluations_give_weighted_and_per_client_means():
    a = _reply(**{"accuracy": 0.5, "num-examples": 10, "accuracy-tail": 1.0,
                  "num-examples-tail": 2, "loss": 1.0})
    b = _reply(**{"accuracy": 1.0, "num-examples": 30, "accuracy-tail": 0.0,
                  "num-examples-tail": 0, "loss": 3.0})
    out = aggregate_client_evaluations([a, b], "num-examples")
    assert out["accuracy"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)
    assert out["mean-accuracy"] == pytest.approx(0.75)  # plain mean over the two clients
    assert out["loss"] == pytest.approx(2.5)
    # only client a has tail samples: b's 0.0 must not count, weighted or not
    assert out["accuracy-tail"] == 1.0 and out["mean-accuracy-tail"] == 1.0
    assert out["clients"] == 2 and "num-examples-tail" not in out


# --- SSE-C ----------------------------------------------------------------------------------

def test_dense_etf_has_unit_columns_at_equal_angles():
    etf = dense_etf(20, 5, torch.Generator().manual_seed(0))
    assert torch.allclose(etf.norm(dim=0), torch.ones(5, dtype=etf.dtype))
    cos = etf.T @ etf
    off = cos[~torch.eye(5, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / 4))
    with pytest.raises(ValueError, match="feature dimension"):
        dense_etf(4, 5, torch.Generator())


def test_sse_c_is_sparse_short_equiangular_and_the_same_for_a_seed():
    d, k = 40, 10
    etf = sparse_etf(d, k, seed=3)  # 2000 steps
    assert int((etf == 0).sum()) == int(0.6 * d * k)
    assert torch.allclose(etf.norm(dim=0), torch.full((k,), 0.1), atol=0.005)
    dense_angle = math.degrees(math.acos(-1 / (k - 1)))  # the best any k vectors can do
    unrefined = sparse_etf(d, k, seed=3, steps=0)
    angles = torch.rad2deg(torch.arccos(nearest_cosines(etf.double())))
    before = torch.rad2deg(torch.arccos(nearest_cosines(unrefined.double())))
    assert angles.min() > dense_angle - 0.2 > before.min()
    assert torch.equal(etf, sparse_etf(d, k, seed=3))
    assert not torch.equal(etf, sparse_etf(d, k, seed=4, steps=10))


# --- GLA-FR ---------------------------------------------------------------------------------

def test_norm_transfer_and_personalized_logits_by_hand():
    local = {"weight": torch.tensor([[3.0, 4.0], [0.0, 1.0]]), "bias": torch.tensor([0.0, 1.0])}
    aux = {"weight": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "bias": torch.tensor([0.5, 0.0])}
    assert torch.equal(norm_transfer(local["weight"], aux["weight"]),
                       torch.tensor([[5.0, 0.0], [0.0, 2.0]]))
    f = torch.tensor([[1.0, 1.0]])
    # class 0: (3 + 4) + 5 + 0.5 = 12.5; class 1: 1 + 1 + 2 + 0 = 4
    assert torch.equal(personalized_logits(f, local, aux), torch.tensor([[12.5, 4.0]]))
    masked = mask_absent_classes(torch.tensor([[12.5, 4.0]]), torch.tensor([1, 1]))
    assert masked[0, 0] == -math.inf and masked[0, 1] == 4.0


def test_generic_head_rows_get_one_norm_and_the_rest_is_untouched():
    weight = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, 0.5]], dtype=np.float32)
    assert np.allclose(realign_rows(weight, 1.7), [[1.02, 1.36], [0, 0], [0, 1.7]])
    arrays = ArrayRecord({"body.weight": Array(np.ones((4, 2), np.float32)),
                          "head.weight": Array(weight), "head.bias": Array(np.ones(3, np.float32))})
    assert classifier_key(arrays) == "head.weight"
    generic = FedLoGe(generic_norm=1.7).evaluation_arrays(arrays)
    assert np.allclose(np.linalg.norm(generic["head.weight"].numpy()[[0, 2]], axis=1), 1.7)
    for key in ("body.weight", "head.bias"):
        assert np.array_equal(generic[key].numpy(), arrays[key].numpy())
    assert np.array_equal(arrays["head.weight"].numpy(), weight)  # the global arrays stay raw


def test_the_sse_c_view_swaps_in_the_clients_frozen_classifier():
    arrays = ArrayRecord({"body.weight": Array(np.ones((12, 4), np.float32)),
                          "head.weight": Array(np.ones((3, 12), np.float32)),
                          "head.bias": Array(np.ones(3, np.float32))})
    settings = {"seed": 5, "sparsity": 0.6, "norm": 1.0, "steps": 10, "lr": 1e-3}
    strategy = FedLoGe(sse_c=settings)
    assert set(strategy.evaluation_variants) == {"raw-aux", "sse-c"}
    assert strategy.evaluation_variants["raw-aux"](arrays) is arrays
    swapped = strategy.with_sse_c(arrays)
    expected = sparse_etf(12, 3, **settings).T.numpy()  # what every client trains against
    assert np.array_equal(swapped["head.weight"].numpy(), expected)
    assert not swapped["head.bias"].numpy().any()  # SSE-C has no bias
    assert np.array_equal(swapped["body.weight"].numpy(), arrays["body.weight"].numpy())
    # a client without SSE-C (an interpolated setting left null): no such view
    assert set(FedLoGe(sse_c={**settings, "norm": None}).evaluation_variants) == {"raw-aux"}


# --- the trainer --------------------------------------------------------------------------

def _client(seed: int = 0) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 12, generator=g)
    y = torch.arange(48) % 3  # classes 0..2 of 4: class 3 is absent
    return ClientData(1, x, y, x[:12], y[:12], num_classes=4, class_groups=np.array([0, 0, 1, 2]))


def _trainer(**kwargs) -> FedLoGeTrainer:
    model_fn = lambda: MLP([12], 4, hidden=[16])  # noqa: E731
    return FedLoGeTrainer(model_fn, seed=0, local_epochs=2, etf_steps=100, device="cpu",
                          **kwargs)


def test_the_local_head_stays_in_client_state_and_carries_over():
    trainer = _trainer()
    torch.manual_seed(0)
    initial = ArrayRecord(trainer.model_fn().state_dict())
    data = _client()
    out = trainer.train(initial, ConfigRecord({"server-round": 1}), data, RecordDict())
    assert set(out.arrays.keys()) == set(initial.keys())  # backbone + aux head only
    head = out.state[LOCAL_HEAD].to_torch_state_dict()
    fresh = trainer.local_head(RecordDict(), classifier_layer(trainer.load_model(initial)), data)
    assert not torch.equal(head["weight"], fresh.weight)  # it trained
    again = trainer.train(out.arrays, ConfigRecord({"server-round": 2}), data, out.state)
    assert not np.array_equal(again.state[LOCAL_HEAD]["weight"].numpy(), head["weight"].numpy())
    metrics = trainer.evaluate(again.arrays, ConfigRecord({}), data, again.state)
    assert {"accuracy-head", "num-examples-tail"} <= set(metrics)


def test_the_backbone_learns_from_sse_c_alone():
    """Heads train on detached features: a different aux head leaves the backbone unchanged."""
    trainer = _trainer()
    torch.manual_seed(0)
    state = trainer.model_fn().state_dict()
    other = {k: (v + 0.3 if k.startswith("net.3") else v) for k, v in state.items()}
    assert classifier_layer(trainer.model_fn()) is not None and "net.3.weight" in state
    data = _client()
    a = trainer.train(ArrayRecord(state), ConfigRecord({"server-round": 1}), data, RecordDict())
    b = trainer.train(ArrayRecord(other), ConfigRecord({"server-round": 1}), data, RecordDict())
    for key in ("net.1.weight", "net.1.bias"):
        assert np.array_equal(a.arrays[key].numpy(), b.arrays[key].numpy())
    assert not np.array_equal(a.arrays["net.3.weight"].numpy(), b.arrays["net.3.weight"].numpy())


def test_local_evaluation_rules_out_classes_the_client_never_trained_on():
    trainer = _trainer()
    torch.manual_seed(0)
    arrays = ArrayRecord(trainer.model_fn().state_dict())
    data = _client()
    trained = trainer.train(arrays, ConfigRecord({"server-round": 1}), data, RecordDict())
    logits = trainer.test_logits(trained.arrays, ConfigRecord({}), data, trained.state)
    assert torch.isinf(logits[:, 3]).all() and torch.isfinite(logits[:, :3]).all()
    unmasked = _trainer(mask_absent_classes=False)
    assert torch.isfinite(unmasked.test_logits(trained.arrays, ConfigRecord({}), data,
                                               trained.state)).all()


def test_the_reference_rule_masks_the_classes_absent_from_the_test_labels():
    """fedsim rules out classes the client never trained on (3); the reference code rules
    out those missing from the split it scores: here every class but 0."""
    trainer = _trainer()
    torch.manual_seed(0)
    data = _client()
    only_zero = ClientData(1, data.x_train, data.y_train, data.x_test[data.y_test == 0],
                           data.y_test[data.y_test == 0], num_classes=4,
                           class_groups=data.class_groups)
    trained = trainer.train(ArrayRecord(trainer.model_fn().state_dict()),
                            ConfigRecord({"server-round": 1}), only_zero, RecordDict())
    metrics = trainer.evaluate(trained.arrays, ConfigRecord({}), only_zero, trained.state)
    assert metrics["reference-accuracy"] == 1.0  # one class left: always right
    logits = trainer.test_logits(trained.arrays, ConfigRecord({}), only_zero, trained.state)
    assert metrics["accuracy"] == (logits.argmax(1) == 0).float().mean().item() < 1.0
    assert "num-examples-reference" not in str(metrics.keys())  # counts are not repeated


def test_fedavg_is_scored_unmasked_under_the_reference_rule():
    model_fn = lambda: MLP([12], 4, hidden=[16])  # noqa: E731
    torch.manual_seed(0)
    arrays = ArrayRecord(model_fn().state_dict())
    data = _client()
    masked = FineTuneTrainer(model_fn, finetune_epochs=0, device="cpu")
    unmasked = FineTuneTrainer(model_fn, finetune_epochs=0, mask_absent_classes=False,
                               device="cpu")
    a = masked.evaluate(arrays, ConfigRecord({}), data, RecordDict())
    b = unmasked.evaluate(arrays, ConfigRecord({}), data, RecordDict())
    for prefix in ("reference-", "reference-global-"):  # the reference never masks FedAvg
        assert a[f"{prefix}accuracy"] == b["accuracy"] == b[f"{prefix}accuracy"]
    assert a["accuracy"] == a["global-accuracy"]  # no fine-tuning: the same head


def test_a_client_without_a_local_head_is_scored_by_the_global_model():
    trainer = _trainer(mask_absent_classes=False)
    torch.manual_seed(0)
    arrays = ArrayRecord(trainer.model_fn().state_dict())
    data = _client()
    logits = trainer.test_logits(arrays, ConfigRecord({}), data, RecordDict())
    with torch.no_grad():
        expected = trainer.load_model(arrays)(data.x_test)
    assert torch.allclose(logits, expected, atol=1e-6)


def test_finetuning_changes_only_the_evaluated_head():
    model_fn = lambda: MLP([12], 4, hidden=[16])  # noqa: E731
    torch.manual_seed(0)
    arrays = ArrayRecord(model_fn().state_dict())
    data = _client()
    tuned = FineTuneTrainer(model_fn, finetune_epochs=3, lr=0.1, momentum=0.0, local_epochs=1,
                            device="cpu")
    plain = FineTuneTrainer(model_fn, finetune_epochs=0, mask_absent_classes=False,
                            momentum=0.0, local_epochs=1, device="cpu")
    before = plain.evaluate(arrays, ConfigRecord({}), data, RecordDict())
    after = tuned.evaluate(arrays, ConfigRecord({}), data, RecordDict())
    assert after["loss"] < before["loss"]
    assert after["global-loss"] != after["loss"]  # the received head, scored in the same pass
    model = tuned.load_model(arrays)  # the cached model still holds the global weights
    assert torch.equal(classifier_layer(model).weight, arrays.to_torch_state_dict()["net.3.weight"])
    f = features(model, data.x_test)
    assert f.shape == (12, 16)


# --- end to end ---------------------------------------------------------------------------

def test_fedloge_run_reports_generic_and_local_accuracy_by_group(tiny_cfg):
    cfg = tiny_cfg(*FEDLOGE, "evaluation.clients_per_round=6", "clients_per_round=6")
    run_experiment(cfg)
    rows = read_metrics(cfg.output_dir)
    last = rows[-1]
    for key in ("server/accuracy-head", "server/accuracy-tail", "client_eval/mean-accuracy",
                "client_eval/mean-accuracy-middle", "train/aux-norm-max",
                "server/raw-aux-accuracy", "server/sse-c-accuracy-tail",
                "client_eval/mean-reference-accuracy"):
        assert key in last, key
    assert last["client_eval/clients"] == 6
    groups = json.loads((Path(cfg.output_dir) / "class_groups.json").read_text())
    assert sorted(sum(groups.values(), [])) == list(range(10)) and groups["head"]
    summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    assert summary["class_groups"] == groups


def test_balanced_data_reports_no_groups(tiny_cfg):
    cfg = tiny_cfg()
    run_experiment(cfg)
    assert not any("head" in key for key in read_metrics(cfg.output_dir)[-1])


@pytest.mark.parametrize(("override", "field"), [
    ("client.etf_sparsity=1.0", "client.etf_sparsity"),
    ("client.etf_norm=0", "client.etf_norm"),
    ("client.etf_steps=1.5", "client.etf_steps"),
    ("strategy.generic_norm=-1", "strategy.generic_norm"),
])
def test_bad_fedloge_settings_are_refused_by_name(tiny_cfg, override, field):
    with pytest.raises(ConfigError, match=field):
        run_experiment(tiny_cfg(*FEDLOGE, override))


@pytest.mark.parametrize("override", ["strategy.sse_c.norm=0.5", "strategy.sse_c.seed=7"])
def test_a_server_sse_c_unlike_the_clients_is_refused(tiny_cfg, override):
    with pytest.raises(ConfigError, match=f"strategy.{override.split('=')[0].split('.', 1)[1]}"):
        run_experiment(tiny_cfg(*FEDLOGE, override))


def test_a_classifier_narrower_than_the_classes_is_refused(tiny_cfg):
    with pytest.raises(ConfigError, match="SSE-C needs the classifier's input width"):
        run_experiment(tiny_cfg(*FEDLOGE, "model.hidden=[8]"))
