"""The few models fedsim needs, written here (no torchvision).

Every model takes `input_shape` (one sample's shape) and `num_classes`, filled in
from the dataset, plus its own hyperparameters from `fedsim/conf/model/*.yaml`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from fedsim.errors import ConfigError, is_number, require


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The model's classifier: its last `nn.Linear` (every fedsim model ends in one).

    Methods that split a network into a feature extractor and a head (FedLoGe,
    head fine-tuning) use it; the features are this layer's input.
    """
    if hasattr(model, "aux") and hasattr(model, "net"):  # a trainer-extended global model
        model = model.net  # (fedsim.clients.local_learning.WithAuxiliary): its network's
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier layer")
    return linears[-1]


@contextmanager
def captured_features(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While active, every forward pass appends the classifier's input (the features).

    The features stay attached to the graph; the model's own logits are unchanged.
    """
    captured: list[torch.Tensor] = []
    handle = classifier_layer(model).register_forward_pre_hook(
        lambda _module, args: captured.append(args[0])
    )
    try:
        yield captured
    finally:
        handle.remove()


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The classifier's input for `x` (one forward pass; gradients flow as usual)."""
    with captured_features(model) as captured:
        model(x)
    return captured[-1]


def layer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model as consecutive blocks whose composition is its forward pass.

    Layer-local methods (tpSGD, Mono-Forward, AugLocal) train each block on a loss
    of its own; the last block is the classifier. The blocks share the model's
    parameters (no copies).
    """
    if not callable(getattr(model, "blocks", None)):
        raise ValueError(
            f"{type(model).__name__} does not split into layer blocks; layer-local trainers "
            "need model=mlp, cnn1d or resmlp"
        )
    return list(model.blocks())


class ChannelAxis(nn.Module):
    """Adds the channel axis a 1-D convolution expects: (B, L) -> (B, 1, L)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1)


class MLP(nn.Module):
    """Fully connected ReLU network on the flattened input."""

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (100, 100)
    ) -> None:
        super().__init__()
        sizes = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def blocks(self) -> list[nn.Module]:
        """One block per Linear (+ its ReLU); the first also flattens."""
        layers = list(self.net)
        first = nn.Sequential(*layers[:3])
        rest = [nn.Sequential(*layers[i : i + 2]) for i in range(3, len(layers), 2)]
        return [first, *rest]


class CNN1D(nn.Module):
    """The MNIST-1D paper's small 1-D CNN: strided convolutions, then a linear layer."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: int = 25,
        num_layers: int = 3,
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        in_channels = 1 if len(input_shape) == 1 else int(input_shape[0])
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers += [
                nn.Conv1d(in_channels if i == 0 else channels, channels, kernel_size, 2, 1),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.one_channel = len(input_shape) == 1
        with torch.no_grad():
            n_flat = self.features(torch.zeros(1, in_channels, input_shape[-1])).numel()
        self.head = nn.Linear(n_flat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_channel:
            x = x.unsqueeze(1)
        return self.head(self.features(x).flatten(1))

    def blocks(self) -> list[nn.Module]:
        """One block per convolution (+ its ReLU), then flatten + the linear head."""
        layers = list(self.features)
        convs = [nn.Sequential(*layers[i : i + 2]) for i in range(0, len(layers), 2)]
        if self.one_channel:
            convs[0] = nn.Sequential(ChannelAxis(), *convs[0])
        return [*convs, nn.Sequential(nn.Flatten(), self.head)]


class ResidualLayer(nn.Module):
    """x + ReLU(LayerNorm(W x)): a post-normalized residual layer (W is scale-invariant)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.norm(self.linear(x)))


class ResMLP(nn.Module):
    """A deep residual, normalized MLP: a linear stem, `depth` residual layers, a head.

    Deep enough for AugLocal's auxiliary networks to matter, and its residual
    weights feed a normalization layer, the case AdamP is made for.
    """

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, width: int = 128, depth: int = 8
    ) -> None:
        for name, value in (("width", width), ("depth", depth)):
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"model.{name} must be an integer >= 1 (got {value})")
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU())
        self.layers = nn.Sequential(*(ResidualLayer(width) for _ in range(depth)))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))

    def blocks(self) -> list[nn.Module]:
        """The stem, each residual layer, the head."""
        return [self.stem, *self.layers, self.head]


class CNN2D(nn.Module):
    """Two conv-pool blocks and two linear layers (the classic FL "CNN")."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        c_in = int(input_shape[0])
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(c_in, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        with torch.no_grad():
            n_flat = self.features(torch.zeros(1, *input_shape)).numel()
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(n_flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class PflCNN(nn.Module):
    """pfl-research's benchmark CNN for CIFAR-10 (its `simple_cnn`): two unpadded 3x3
    convolutions, one 2x2 max-pool, dropout, a hidden dense layer and dropout again,
    Glorot-uniform weights as its TF2 twin. Takes channels-first images (C, H, W)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        dropout: Sequence[float] = (0.25, 0.5),
    ) -> None:
        require(len(dropout) == 2 and all(is_number(p) and 0 <= p < 1 for p in dropout),
                "model.dropout", "two probabilities in [0, 1) (after the convolutions, after "
                "the hidden layer)", list(dropout))
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(int(input_shape[0]), c1, 3), nn.ReLU(),
            nn.Conv2d(c1, c2, 3), nn.ReLU(),
            nn.MaxPool2d(2), nn.Dropout(dropout[0]), nn.Flatten(),
        )
        with torch.no_grad():
            n_flat = self.features(torch.zeros(1, *input_shape)).shape[1]
        self.head = nn.Sequential(
            nn.Linear(n_flat, hidden), nn.ReLU(), nn.Dropout(dropout[1]),
            nn.Linear(hidden, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.xavier_uniform_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    raise ValueError(f"model.norm must be 'batch' or 'group', got '{kind}'")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(norm, c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem without max-pool, four stages of basic blocks."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        blocks: Sequence[int] = (2, 2, 2, 2),
        width: int = 64,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(int(input_shape[0]), width, 3, 1, 1, bias=False),
            _norm(norm, width),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        c_in = width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            for j in range(n):
                stages.append(BasicBlock(c_in, c_out, 2 if (j == 0 and i > 0) else 1, norm))
                c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def resnet18(input_shape: Sequence[int], num_classes: int, **kwargs) -> ResNet:
    return ResNet(input_shape, num_classes, blocks=(2, 2, 2, 2), **kwargs)


def resnet34(input_shape: Sequence[int], num_classes: int, **kwargs) -> ResNet:
    return ResNet(input_shape, num_classes, blocks=(3, 4, 6, 3), **kwargs)
