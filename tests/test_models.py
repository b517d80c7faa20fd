import pytest
import torch

from fedsim.models import CNN1D, CNN2D, MLP, resnet18, resnet34


@pytest.mark.parametrize(
    ("build", "shape", "classes"),
    [
        (lambda s, k: MLP(s, k), (40,), 10),
        (lambda s, k: MLP(s, k, hidden=[8]), (1, 8, 8), 10),
        (lambda s, k: CNN1D(s, k), (40,), 10),
        (lambda s, k: CNN2D(s, k), (1, 8, 8), 10),
        (lambda s, k: CNN2D(s, k), (3, 32, 32), 7),
        (lambda s, k: resnet18(s, k, width=8), (3, 32, 32), 10),
        (lambda s, k: resnet34(s, k, width=8, norm="group"), (3, 32, 32), 100),
    ],
)
def test_models_map_a_batch_to_class_logits(build, shape, classes):
    model = build(list(shape), classes)
    assert model(torch.randn(4, *shape)).shape == (4, classes)


def test_resnet_rejects_an_unknown_norm():
    with pytest.raises(ValueError, match="model.norm"):
        resnet18([3, 32, 32], 10, norm="layer")
