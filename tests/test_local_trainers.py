"""Layer-local trainers (tpSGD, Mono-Forward, AugLocal), optimizers, centralized runs."""

from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedsim.clients.auglocal import AugLocalTrainer, aux_depths, num_local_blocks, picked_blocks
from fedsim.clients.local_learning import (
    network_and_aux,
    saved_activation_peak,
    shared_generator,
)
from fedsim.clients.mono_forward import MonoForwardTrainer
from fedsim.clients.sgd import SGDTrainer
from fedsim.clients.tpsgd import TPSGDTrainer, projection_matrix, target_projection_loss
from fedsim.datasets.federated import build_federated_data
from fedsim.errors import ConfigError
from fedsim.experiment import run_experiment
from fedsim.models import CNN1D, MLP, ResMLP, layer_blocks
from fedsim.runtime import build_trainer, initial_model, preflight
from tests.conftest import read_metrics
from tests.test_trainer import blobs

LAYER_LOCAL = {
    "tpsgd-ce": (TPSGDTrainer, {"loss": "ce"}),
    "tpsgd-mse": (TPSGDTrainer, {"loss": "mse", "local_epochs": 10}),  # slower to fit
    "mono_forward": (MonoForwardTrainer, {}),
    "auglocal": (AugLocalTrainer, {"max_depth": 2}),
}


def network(kind: str = "mlp") -> torch.nn.Module:
    if kind == "resmlp":
        return ResMLP([6], 3, width=16, depth=4)
    return MLP([6], 3, hidden=[16, 16])


def layer_local(name: str, kind: str = "mlp", **kwargs):
    cls, options = LAYER_LOCAL[name]
    options = {**options, **kwargs}
    trainer_options = {"lr": 0.1, "momentum": 0.9, "local_epochs": 5,
                       **{k: v for k, v in options.items() if k != "decay"}}

    def model_fn():
        torch.manual_seed(0)
        return cls.extend_model(network(kind), (6,), 3, options)

    return cls(model_fn, seed=0, **trainer_options)


def initial(trainer):
    from flwr.app import ArrayRecord

    return ArrayRecord(trainer.model_fn().state_dict())


@pytest.mark.parametrize("model", [MLP([40], 10), CNN1D([40], 10), CNN1D([3, 40], 10),
                                   ResMLP([40], 10, width=8, depth=3)])
def test_blocks_compose_to_the_forward_pass(model):
    x = torch.randn(5, *([3, 40] if isinstance(model, CNN1D) and not model.one_channel else [40]))
    h = x
    for block in layer_blocks(model):
        h = block(h)
    assert torch.equal(h, model(x))


@pytest.mark.parametrize("name", sorted(LAYER_LOCAL))
def test_each_layer_local_trainer_lowers_the_loss(name):
    trainer = layer_local(name, "resmlp" if name == "auglocal" else "mlp")
    data, arrays = blobs(), initial(trainer)
    before = trainer.evaluate(arrays, ConfigRecord(), data, RecordDict())
    out = trainer.train(arrays, ConfigRecord({"server-round": 1}), data, RecordDict())
    after = trainer.evaluate(out.arrays, ConfigRecord(), data, RecordDict())
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.6  # chance: 1/3
    assert set(out.arrays.keys()) == set(arrays.keys())  # auxiliaries are uploaded too


def owners(model: torch.nn.Module, name: str) -> list[set[int]]:
    """Parameter ids of each trained group: its blocks plus its auxiliary module."""
    net, aux = network_and_aux(model)
    blocks = layer_blocks(net)
    trainer = layer_local(name, "resmlp" if name == "auglocal" else "mlp")
    groups = trainer.groups(len(blocks))
    result = []
    for index, group in enumerate(groups):
        ids = {id(p) for i in group for p in blocks[i].parameters()}
        if index < len(aux):
            ids |= {id(p) for p in aux[index].parameters()}
        result.append(ids)
    return result


@pytest.mark.parametrize("name", sorted(LAYER_LOCAL))
def test_no_gradient_crosses_a_group_boundary(name):
    trainer = layer_local(name, "resmlp" if name == "auglocal" else "mlp")
    model = trainer.model_fn()
    data = blobs()
    groups = owners(model, name)
    assert len(groups) >= 2
    inputs: list[torch.Tensor] = []
    net, _ = network_and_aux(model)
    # blocks() may wrap the model's modules anew on each call: hook each block's first module
    entries = [b[0] if isinstance(b, torch.nn.Sequential) else b for b in layer_blocks(net)]
    hooks = [m.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
             for m in entries]
    for k in range(len(groups)):
        inputs.clear()
        model.zero_grad(set_to_none=True)
        losses = trainer.layer_losses(model, data.x_train[:16], data.y_train[:16])
        for _ in range(k):
            next(losses)  # earlier groups' losses, never backpropagated
        next(losses).backward()
        with_grad = {id(p) for p in model.parameters() if p.grad is not None}
        assert with_grad and with_grad <= groups[k], f"group {k}'s loss reached other groups"
    for h in hooks:
        h.remove()
    assert len(inputs) == len(layer_blocks(net))  # the last pass ran every block once
    for group in trainer.groups(len(inputs)):
        assert not inputs[group[0]].requires_grad  # each group's input is detached
        assert all(inputs[i].requires_grad for i in group[1:])  # inside a group: backprop


def test_tpsgd_projections_are_shared_by_seed_and_never_uploaded():
    a = TPSGDTrainer(lambda: network(), seed=7).projection(0, 3, 16)
    b = TPSGDTrainer(lambda: network(), seed=7).projection(0, 3, 16)  # another client
    assert torch.equal(a, b)
    assert not torch.equal(a, TPSGDTrainer(lambda: network(), seed=8).projection(0, 3, 16))
    assert not torch.equal(a, projection_matrix(7, 1, 3, 16))  # each layer its own
    trainer = layer_local("tpsgd-ce")
    out = trainer.train(initial(trainer), ConfigRecord({"server-round": 1}), blobs(), RecordDict())
    assert set(out.arrays.keys()) == set(network().state_dict().keys())


def test_shared_generator_depends_on_seed_and_tags_only():
    draw = lambda *args: torch.randn(4, generator=shared_generator(*args))  # noqa: E731
    assert torch.equal(draw(1, "x", 2), draw(1, "x", 2))
    assert not torch.equal(draw(1, "x", 2), draw(1, "x", 3))
    assert not torch.equal(draw(1, "x", 2), draw(2, "x", 2))


def test_tpsgd_losses_by_hand():
    projection = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    h, y = torch.tensor([[1.0, 1.0]]), torch.tensor([1])
    mse = target_projection_loss(h, y, projection, "mse", 0.5)  # target 0.5 * [0, 2]
    assert mse.item() == pytest.approx(((1 - 0) ** 2 + (1 - 1) ** 2) / 2)
    ce = target_projection_loss(h, y, projection, "ce", 1.0)  # logits [1, 2] / sqrt(2)
    logits = torch.tensor([1.0, 2.0]) / 2**0.5
    assert ce.item() == pytest.approx(-torch.log_softmax(logits, 0)[1].item())


def test_auglocal_depth_schedule_by_hand():
    assert aux_depths(9, 3, 0.5) == [3, 3, 3, 2, 2, 2, 2, 2, 2]
    assert aux_depths(5, 4, 0.5) == [4, 4, 3, 2, 2]  # 4 * (1 - 0.5 * l / 4), rounded half-even
    assert picked_blocks(0, 9, 3) == [1, 4, 8] and picked_blocks(6, 9, 2) == [7, 8]
    assert picked_blocks(3, 9, 1) == [8]  # the last pick is always the final hidden block
    assert num_local_blocks(9, 3, 0.5) == 7  # blocks 7, 8 train with the classifier
    assert num_local_blocks(3, 3, 0.5) == 0  # too shallow: plain backprop


def test_auglocal_auxiliary_nets_are_fresh_copies_of_later_blocks():
    torch.manual_seed(0)
    model = AugLocalTrainer.extend_model(ResMLP([6], 3, width=16, depth=4), (6,), 3,
                                         {"max_depth": 2, "decay": 0.5})
    net, aux = network_and_aux(model)
    assert len(aux) == num_local_blocks(5, 2, 0.5) == 4  # depths [2, 2, 2, 1, 1]
    first = aux[0][0]  # a copy of residual layer 2 (block index picked_blocks(0, 5, 2)[0])
    original = layer_blocks(net)[picked_blocks(0, 5, 2)[0]]
    assert type(first) is type(original)
    assert not torch.equal(first.linear.weight, original.linear.weight)
    assert torch.equal(model(torch.ones(2, 6)), net(torch.ones(2, 6)))  # inference: the net


def test_layer_local_training_holds_less_activation_memory_than_backprop():
    torch.manual_seed(0)
    x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))

    def peak(trainer):
        model = trainer.model_fn()
        with saved_activation_peak() as result:
            loss = trainer.objective(model, x, y)
            if loss.requires_grad:
                loss.backward()
        return result[0]

    deep = lambda: ResMLP([40], 10, width=64, depth=8)  # noqa: E731
    backprop = peak(SGDTrainer(deep))
    forward = peak(MonoForwardTrainer(
        lambda: MonoForwardTrainer.extend_model(deep(), (40,), 10, {})))
    assert 0 < forward < backprop / 3


MONO_FORWARD = ["client=mono_forward", "model=resmlp"]


@pytest.mark.parametrize("optimizer,method", [
    ("sgd", MONO_FORWARD), ("adam", MONO_FORWARD), ("adamw", MONO_FORWARD),
    ("adamp", MONO_FORWARD), ("conda", MONO_FORWARD), ("adamw", ["client=noprop", "model=noprop"]),
    ("adamw", ["client=forward_gnn", "model=gnn"]), ("conda", ["client=tpsgd", "model=mlp"]),
])
def test_every_optimizer_trains_any_trainer(tiny_cfg, optimizer, method):
    sizes = {"model=resmlp": ["model.width=16", "model.depth=3"],
             "model=noprop": ["model.num_blocks=3", "model.hidden=32"],
             "model=gnn": ["model.hidden=[32]"], "model=mlp": []}[method[1]]
    cfg = tiny_cfg(*method, *sizes, f"optimizer={optimizer}", "client.lr=0.01",
                   "optimizer.update_proj_gap=5" if optimizer == "conda"
                   else "client.weight_decay=0.0")
    data = build_federated_data(cfg)
    trainer = build_trainer(cfg, data)
    expected = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "adamp": "AdamP",
                "conda": "Conda"}[optimizer]
    built = trainer.make_optimizer(list(trainer.model_fn().parameters()), round_one(trainer))
    assert type(built).__name__ == expected
    from flwr.app import ArrayRecord

    arrays = ArrayRecord(initial_model(cfg, data).state_dict())
    client = data.client(0)
    before = trainer.evaluate(arrays, ConfigRecord(), client, RecordDict())
    out = trainer.train(arrays, ConfigRecord({"server-round": 1}), client, RecordDict())
    after = trainer.evaluate(out.arrays, ConfigRecord(), client, RecordDict())
    assert out.metrics["train_loss"] > 0 and after["loss"] < before["loss"]


def test_optimizer_learning_rate_follows_the_client_schedule(tiny_cfg):
    cfg = tiny_cfg("optimizer=adamw", "client.lr=0.01", "client.lr_decay=0.5",
                   "client.weight_decay=0.02")
    trainer = build_trainer(cfg, build_federated_data(cfg))
    third = trainer.round_settings(ConfigRecord({"server-round": 3}))
    group = trainer.make_optimizer([torch.nn.Parameter(torch.ones(2))], third).param_groups[0]
    assert group["lr"] == pytest.approx(0.01 * 0.5**2) and group["weight_decay"] == 0.02


def test_sgd_optimizer_group_takes_the_client_momentum(tiny_cfg):
    cfg = tiny_cfg("client.momentum=0.7")
    trainer = build_trainer(cfg, build_federated_data(cfg))
    probe = [torch.nn.Parameter(torch.ones(2))]
    group = trainer.make_optimizer(probe, round_one(trainer)).param_groups[0]
    assert group["momentum"] == 0.7


def test_a_model_without_blocks_is_refused_before_any_work(tiny_cfg):
    cfg = tiny_cfg("client=tpsgd", "dataset=digits", "model=cnn2d")
    with pytest.raises(ConfigError, match="model=mlp, cnn1d or resmlp"):
        preflight(cfg)


@pytest.mark.parametrize("overrides,field", [
    (["client=tpsgd", "client.loss=hinge"], "client.loss"),
    (["client=tpsgd", "client.target_scale=0"], "client.target_scale"),
    (["client=auglocal", "model=resmlp", "client.max_depth=0"], "client.max_depth"),
    (["client=auglocal", "model=resmlp", "client.decay=fast"], "client.decay"),
    (["client=auglocal", "model=resmlp", "client.decay=1.5"], "client.decay"),
    (["optimizer=adamw", "optimizer.betas=[1.5,0.9]"], "optimizer"),
    (["optimizer=conda", "optimizer.update_proj_gap=0"], "optimizer"),
    (["client=noprop", "model=noprop", "client.eta=0"], "client.eta"),
    (["client=noprop", "model=noprop", "model.num_blocks=0"], "model.num_blocks"),
    (["client=forward_gnn", "model=gnn", "client.anchor_fraction=1.0"], "client.anchor_fraction"),
    (["client=forward_gnn", "model=gnn", "model.conv=gat"], "model.conv"),
    (["client=noprop", "model=mlp"], "model"),
    (["client=sgd", "model=gnn"], "client"),
    (["client=sgd", "model=noprop"], "client"),
    (["client=auglocal", "model=cnn1d"], "model"),  # too shallow: would be plain backprop
    (["client=forward_gnn", "model=gnn", "model.k=2.5"], "model.k"),
    (["client=forward_gnn", "model=gnn", "model.temperature=0"], "model.temperature"),
    (["client=forward_gnn", "model=gnn", "model.hidden=[0]"], "model.hidden"),
    (["client=tpsgd", "model=resmlp", "model.depth=0"], "model.depth"),
    (["client=noprop", "model=noprop", "model.learn_embeddings=maybe"], "model.learn_embeddings"),
    (["client=tpsgd", "client.target_scale=big"], "client.target_scale"),
    (["strategy=staleness_inversion", "devices=fixed", "+optimizer.nesterov=true"], "optimizer"),
])
def test_bad_trainer_and_optimizer_settings_fail_before_any_work(tiny_cfg, overrides, field):
    cfg = tiny_cfg(*overrides)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        preflight(cfg)
    assert not Path(cfg.output_dir).exists()  # nothing written


def test_staleness_inversion_refuses_another_optimizer(tiny_cfg):
    cfg = tiny_cfg("strategy=staleness_inversion", "devices=fixed", "optimizer=adam")
    with pytest.raises(ConfigError, match="optimizer"):
        preflight(cfg)


@pytest.mark.parametrize("client,model", [("tpsgd", "mlp"), ("mono_forward", "cnn1d"),
                                          ("auglocal", "resmlp")])
def test_federated_run_with_a_layer_local_trainer(tiny_cfg, client, model):
    cfg = tiny_cfg(f"client={client}", f"model={model}", "model.depth=4"
                   if model == "resmlp" else "client.batch_size=32")
    summary = run_experiment(cfg)
    rows = read_metrics(cfg.output_dir)
    assert rows[-1]["round"] == 2 and rows[-1]["server/accuracy"] > rows[0]["server/accuracy"]
    assert rows[-1]["server/accuracy"] > 0.15  # chance: 0.1
    assert summary["final"]["server/accuracy"] == rows[-1]["server/accuracy"]


def test_centralized_is_a_single_client_run_of_the_same_trainer(tiny_cfg):
    cfg = tiny_cfg("+experiment=centralized", "client=mono_forward", "num_rounds=3",
                   "num_clients=1", "clients_per_round=1",
                   "evaluation.clients_per_round=0")  # as the preset
    run_experiment(cfg)
    rows = read_metrics(cfg.output_dir)
    assert cfg.num_clients == cfg.clients_per_round == 1
    trained = [r for r in rows if r["round"] > 0]
    assert len(trained) == 3 and all(r["bytes_up"] == r["bytes_down"] > 0 for r in trained)
    accuracy = [r["server/accuracy"] for r in rows]
    assert accuracy[-1] > accuracy[0] + 0.2


def round_one(trainer):
    """The trainer's own settings for round 1 (no server values)."""
    return trainer.round_settings(ConfigRecord({"server-round": 1}))
