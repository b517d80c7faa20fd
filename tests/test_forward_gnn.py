"""ForwardGNN single-forward: k-NN graph, layer-local losses, shared class nodes, runs."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim.clients.forward_gnn import (
    ForwardGNN,
    ForwardGNNTrainer,
    layer_logits,
    layer_losses,
    split_anchors,
    summed_softmax,
)
from fedsim.experiment import run_experiment
from fedsim.graph import knn_graph
from tests.conftest import read_metrics
from tests.test_trainer import blobs


def edge_set(edge_index: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(s), int(t)) for s, t in edge_index.T}


def test_anchor_and_query_nodes_split_the_batch():
    torch.manual_seed(0)
    anchor, query = split_anchors(10, 0.3)
    assert int(anchor.sum()) == 3 and torch.equal(query, ~anchor)


def model(**kwargs) -> ForwardGNN:
    torch.manual_seed(0)
    return ForwardGNN([6], 3, **{"hidden": [16, 16], "k": 5, **kwargs})


def test_training_lowers_the_loss_and_beats_chance():
    trainer = ForwardGNNTrainer(model, seed=0, lr=0.05, momentum=0.9, local_epochs=5,
                                batch_size=60)
    data, arrays = blobs(), ArrayRecord(model().state_dict())
    before = trainer.evaluate(arrays, ConfigRecord(), data, RecordDict())
    torch.manual_seed(1)  # the client app seeds the global RNG (anchor splits)
    out = trainer.train(arrays, ConfigRecord({"server-round": 1}), data, RecordDict())
    after = trainer.evaluate(out.arrays, ConfigRecord(), data, RecordDict())
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.8  # chance: 1/3
    assert set(out.arrays.keys()) == set(arrays.keys())
    trained, initial = out.arrays.to_torch_state_dict(), arrays.to_torch_state_dict()
    assert not torch.equal(trained["class_embedding_1"], initial["class_embedding_1"])


@pytest.mark.parametrize("conv", ["sage", "gcn"])
def test_no_gradient_crosses_a_layer(conv):
    net = model(hidden=[8, 8, 8], conv=conv)
    data = blobs(30)
    x = data.x_train.clone().requires_grad_(True)
    edges = knn_graph(x.detach(), net.k)
    anchor, query = split_anchors(len(x), 0.5)
    inputs = []
    for conv_layer in net.convs:
        conv_layer.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    for layer in range(len(net.convs)):
        net.zero_grad(set_to_none=True)
        for index, (loss, _) in enumerate(layer_losses(net, x, edges, data.y_train, anchor,
                                                       query)):
            if index == layer:
                loss.backward()
        for index, conv_layer in enumerate(net.convs):
            grads = [p.grad for p in conv_layer.parameters()]
            if index == layer:
                assert all(g is not None and g.abs().sum() > 0 for g in grads)
            else:
                assert all(g is None for g in grads)
    assert inputs and not any(h.requires_grad for h in inputs)
    assert x.grad is None


def test_class_nodes_are_shared_by_every_party():
    torch.manual_seed(1)
    first = ForwardGNN([40], 10, class_seed=7)
    torch.manual_seed(2)
    second = ForwardGNN([40], 10, class_seed=7)
    other = ForwardGNN([40], 10, class_seed=8)
    assert torch.equal(first.class_features, second.class_features)
    assert not torch.equal(first.class_features, other.class_features)
    assert not torch.equal(first.convs[0].lin_l.weight, second.convs[0].lin_l.weight)
    assert "class_features" in first.state_dict()


def test_karate_club_fits_its_training_nodes():
    from torch_geometric.datasets import KarateClub

    graph = KarateClub()[0]
    torch.manual_seed(0)
    net = ForwardGNN([graph.num_features], 4, hidden=[16, 16])
    anchor = graph.train_mask  # one labelled node per class, linked to its class node
    query = ~anchor & (torch.arange(graph.num_nodes) % 2 == 0)  # labelled, not linked
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)

    def step() -> float:
        optimizer.zero_grad()
        total = 0.0
        for loss, _ in layer_losses(net, graph.x, graph.edge_index, graph.y, anchor, query):
            loss.backward()
            total += loss.item()
        optimizer.step()
        return total

    first = step()
    for _ in range(150):
        last = step()
    with torch.no_grad():
        logits = [z for z, _ in layer_logits(net, graph.x, graph.edge_index, graph.y, anchor)]
    accuracy = (summed_softmax(logits)[query] == graph.y[query]).float().mean()
    assert last < first / 2 and accuracy == 1.0  # the query nodes (those with a loss) fit


def test_inference_returns_log_probabilities():
    net = model()
    logp = net(torch.randn(7, 6))
    assert logp.shape == (7, 3) and torch.allclose(logp.exp().sum(1), torch.ones(7))
    assert net(torch.randn(1, 6)).shape == (1, 3)  # a lone node: no edges


def test_federated_run_with_forward_gnn(tiny_cfg):
    cfg = tiny_cfg("client=forward_gnn", "model=gnn", "model.hidden=[16,16]",
                   "client.batch_size=64")
    summary = run_experiment(cfg)
    rows = read_metrics(cfg.output_dir)
    assert rows[-1]["round"] == 2 and rows[-1]["server/accuracy"] > rows[0]["server/accuracy"]
    assert rows[-1]["server/accuracy"] > 0.15  # chance: 0.1
    assert summary["final"]["server/accuracy"] == rows[-1]["server/accuracy"]
