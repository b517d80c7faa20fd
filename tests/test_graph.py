"""k-NN graphs over a batch, and the backprop GNN baseline (`model=knn_gnn`)."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim.clients.sgd import SGDTrainer
from fedsim.errors import ConfigError
from fedsim.experiment import run_experiment
from fedsim.graph import KNNGraphNet, knn_graph
from tests.conftest import read_metrics
from tests.test_trainer import blobs


def edge_set(edge_index: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(s), int(t)) for s, t in edge_index.T}


def test_knn_graph_links_nearest_points_both_ways():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [12.0, 0.0], [0.0, 3.0]])
    # nearest: 0->1, 1->0, 2->3, 3->2, 4->0 (3 < sqrt(10)); symmetrized
    assert edge_set(knn_graph(x, 1)) == {(0, 1), (1, 0), (2, 3), (3, 2), (4, 0), (0, 4)}
    # second nearest: 0->4, 1->4, 2->1, 3->1, 4->1
    expected = {(0, 1), (0, 4), (1, 0), (1, 4), (2, 3), (2, 1), (3, 2), (3, 1), (4, 0), (4, 1)}
    expected |= {(t, s) for s, t in expected}
    edges = knn_graph(x, 2)
    assert edge_set(edges) == expected and edges.shape[1] == len(expected)  # no duplicates
    assert torch.equal(edges, knn_graph(x, 2))
    assert knn_graph(x, 10).shape[1] == 5 * 4  # k capped at N - 1: complete graph, no loops
    assert knn_graph(x[:1], 3).shape == (2, 0)


def net(k: int = 3) -> KNNGraphNet:
    torch.manual_seed(0)
    return KNNGraphNet([6], 3, hidden=[8, 8], k=k)


def test_a_node_depends_on_its_neighbours_only_with_a_graph():
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    moved = x.clone()
    moved[5] += 5.0  # another node moves; node 0's own features stay
    with torch.no_grad():
        for k, changes in ((0, False), (5, True)):
            model = net(k)
            changed = not torch.equal(model(x)[0], model(moved)[0])
            assert changed == changes


def test_no_graph_equals_each_node_alone():
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    model = net(0)
    with torch.no_grad():
        alone = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
        torch.testing.assert_close(model(x), alone)  # same ops row by row: float tolerance


def test_backprop_training_fits_the_blobs():
    trainer = SGDTrainer(lambda: net(5), seed=0, lr=0.05, momentum=0.9, local_epochs=5,
                         batch_size=60)
    data, arrays = blobs(), ArrayRecord(net(5).state_dict())
    before = trainer.evaluate(arrays, ConfigRecord(), data, RecordDict())
    out = trainer.train(arrays, ConfigRecord({"server-round": 1}), data, RecordDict())
    after = trainer.evaluate(out.arrays, ConfigRecord(), data, RecordDict())
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.8  # chance: 1/3


@pytest.mark.parametrize("kwargs", [{"k": -1}, {"hidden": []}, {"conv": "gat"}])
def test_bad_settings_name_the_field(kwargs):
    with pytest.raises(ConfigError, match=f"model.{next(iter(kwargs))}"):
        KNNGraphNet([6], 3, **kwargs)


def test_federated_run_with_the_backprop_gnn(tiny_cfg):
    cfg = tiny_cfg("client=sgd", "model=knn_gnn", "model.hidden=[16,16]", "client.batch_size=64",
                   "optimizer=adam", "client.lr=0.003")
    run_experiment(cfg)
    rows = read_metrics(cfg.output_dir)
    assert rows[-1]["round"] == 2 and rows[-1]["server/accuracy"] > 0.15  # chance: 0.1
