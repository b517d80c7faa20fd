import pytest
import torch

from fedsim.models import CNN1D, CNN2D, MLP, resnet18, resnet34


@pytest.mark.parametrize(
    ("build", "shape"),
    [
        (lambda s: MLP(s, 10), (40,)),
        (lambda s: MLP(s, 10, hidden=[8]), (1, 8, 8)),
        (lambda s: CNN1D(s, 10), (40,)),
        (lambda s: CNN2D(s, 10), (1, 8, 8)),
        (lambda s: CNN2D(s, 10), (3, 32, 32)),
        (lambda s: resnet18(s, 10, width=8), (3, 32, 32)),
        (lambda s: resnet34(s, 100, width=8, norm="group"), (3, 32, 32)),
    ],
)
def test_models_map_a_batch_to_class_logits(build, shape):
    model = build(list(shape))
    out = model(torch.randn(4, *shape))
    assert out.shape == (4, model(torch.randn(1, *shape)).shape[1])
    assert out.shape[1] in (10, 100)


def test_resnet_rejects_an_unknown_norm():
    with pytest.raises(ValueError, match="model.norm"):
        resnet18([3, 32, 32], 10, norm="layer")
