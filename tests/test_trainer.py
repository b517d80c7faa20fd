import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim.clients.base import TrainOutput
from fedsim.clients.sgd import SGDTrainer
from fedsim.datasets.federated import ClientData
from fedsim.models import MLP


def blobs(n=120, seed=0) -> ClientData:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 6, generator=gen) + 3 * torch.nn.functional.one_hot(y, 6).float()
    return ClientData(0, x, y, x[:30], y[:30], num_classes=3)


def trainer(**kwargs) -> SGDTrainer:
    # momentum 0 and 1 local epoch, SGDTrainer's defaults when these tests were written
    kwargs = {"momentum": 0.0, "local_epochs": 1, **kwargs}
    return SGDTrainer(lambda: MLP([6], 3, hidden=[16]), seed=0, **kwargs)


def initial_arrays() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(MLP([6], 3, hidden=[16]).state_dict())


def test_train_output_requires_num_examples():
    with pytest.raises(ValueError, match="num-examples"):
        TrainOutput(arrays=ArrayRecord(), metrics={"loss": 1.0})


def test_sgd_lowers_the_loss_and_reports_num_examples():
    data, arrays = blobs(), initial_arrays()
    t = trainer(lr=0.1, local_epochs=5)
    before = t.evaluate(arrays, ConfigRecord(), data, RecordDict())
    out = t.train(arrays, ConfigRecord({"server-round": 1}), data, RecordDict())
    after = t.evaluate(out.arrays, ConfigRecord(), data, RecordDict())
    assert out.metrics["num-examples"] == 120
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.8


def test_same_seed_and_round_give_identical_uploads_and_rounds_differ():
    data, arrays = blobs(), initial_arrays()
    conf1, conf2 = ConfigRecord({"server-round": 1}), ConfigRecord({"server-round": 2})
    a = trainer().train(arrays, conf1, data, RecordDict()).arrays.to_numpy_ndarrays()
    b = trainer().train(arrays, conf1, data, RecordDict()).arrays.to_numpy_ndarrays()
    c = trainer().train(arrays, conf2, data, RecordDict()).arrays.to_numpy_ndarrays()
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_proximal_term_from_the_round_config_keeps_weights_close():
    data, arrays = blobs(), initial_arrays()
    start = arrays.to_numpy_ndarrays()

    def drift(config):
        out = trainer(lr=0.1, local_epochs=3).train(arrays, config, data, RecordDict())
        return sum(np.abs(a - b).sum() for a, b in zip(out.arrays.to_numpy_ndarrays(), start,
                                                     strict=True))

    free = drift(ConfigRecord({"server-round": 1}))
    held = drift(ConfigRecord({"server-round": 1, "proximal-mu": 5.0}))
    assert held < 0.5 * free


def test_a_server_can_rerun_the_client_procedure_on_its_own_data():
    """The same trainer object, built anywhere, is a pure function of its inputs."""
    data, arrays = blobs(seed=3), initial_arrays()
    conf = ConfigRecord({"server-round": 4})
    on_client = trainer().train(arrays, conf, data, RecordDict())
    on_server = trainer().train(arrays, conf, data, RecordDict())
    for x, y in zip(on_client.arrays.to_numpy_ndarrays(), on_server.arrays.to_numpy_ndarrays(),
                    strict=True):
        np.testing.assert_array_equal(x, y)


def test_evaluate_on_an_empty_test_split_reports_zero_examples():
    data = blobs()
    empty = ClientData(0, data.x_train, data.y_train, data.x_test[:0], data.y_test[:0], 3)
    metrics = trainer().evaluate(initial_arrays(), ConfigRecord(), empty, RecordDict())
    assert metrics["num-examples"] == 0
