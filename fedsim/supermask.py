"""Supermask networks (Ramanujan et al. 2020; Zhou et al. 2019) for FRL.

A supermask layer never trains its weights: they are fixed "signed constants"
(±sqrt(2 / fan_in), signs drawn at random). What trains is one score per edge;
the forward pass keeps the edges whose scores rank in the top `1 - sparsity`
fraction and zeroes the rest, and the gradient reaches the scores straight
through that hard mask.

Every party must build the same frozen weights and initial scores, so each layer
draws them from its own generator, seeded from the model's `seed` and the layer's
position; the global RNG is never touched. The weights are non-persistent
buffers: the state dict, and so every message, carries the scores alone.

`mask_mode` picks what "top" means:
- `reference` (default): top by |score|, as the FRL authors' code does. Since the
  vote hands out the sorted initial values, which are symmetric around 0, this
  keeps both the most- and the least-voted edges.
- `topk`: top by the signed score, as the FRL paper describes (keep the edges with
  the highest reputation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fedsim.errors import require

MASK_MODES = ("reference", "topk")


class StraightThroughMask(torch.autograd.Function):
    """1 for the `keep` largest entries of `ranked`, else 0; identity gradient."""

    @staticmethod
    def forward(ctx, ranked: torch.Tensor, keep: int) -> torch.Tensor:  # noqa: D102
        return top_mask(ranked, keep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return grad, None


def top_mask(ranked: torch.Tensor, keep: int) -> torch.Tensor:
    """A 0/1 tensor shaped like `ranked` with ones at its `keep` largest entries.

    Ties are broken by position (a stable sort), so every party gets the same mask.
    """
    mask = torch.zeros(ranked.numel(), dtype=ranked.dtype, device=ranked.device)
    order = torch.argsort(ranked.detach().flatten(), stable=True)
    mask[order[ranked.numel() - keep :]] = 1
    return mask.view_as(ranked)


def kept_edges(num_edges: int, sparsity: float) -> int:
    """How many edges the mask keeps: int(sparsity * n) of them are zeroed.

    `sparsity` is the fraction zeroed; the reference's `k` is the fraction kept
    (it zeroes int((1 - k) * n)). The two agree at the default, 0.5.
    """
    return num_edges - int(sparsity * num_edges)


class SupermaskLayer(nn.Module):
    """Frozen signed-constant weights of `shape`, trainable scores, no bias.

    `op` is the functional operation applied with the masked weight
    (`F.linear`, `F.conv1d` or `F.conv2d`), with `op_kwargs` such as padding.
    """

    def __init__(
        self,
        shape: Sequence[int],
        op,
        generator: torch.Generator,
        sparsity: float = 0.5,
        mask_mode: str = "reference",
        **op_kwargs,
    ) -> None:
        super().__init__()
        require(mask_mode in MASK_MODES, "model.mask_mode", f"one of {MASK_MODES}", mask_mode)
        fan_in = math.prod(shape[1:])
        signs = torch.randint(0, 2, tuple(shape), generator=generator).float() * 2 - 1
        self.register_buffer("weight", signs * math.sqrt(2.0 / fan_in), persistent=False)
        scores = torch.empty(tuple(shape))
        nn.init.kaiming_uniform_(scores, a=math.sqrt(5), generator=generator)
        self.scores = nn.Parameter(scores)
        self.op = op
        self.op_kwargs = op_kwargs
        self.sparsity = sparsity
        self.mask_mode = mask_mode

    def mask(self) -> torch.Tensor:
        """The current 0/1 mask (differentiable straight through to the scores)."""
        ranked = self.scores.abs() if self.mask_mode == "reference" else self.scores
        return StraightThroughMask.apply(ranked, kept_edges(self.scores.numel(), self.sparsity))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.weight * self.mask(), **self.op_kwargs)


class SupermaskNet(nn.Module):
    """Base for supermask models: one seeded generator hands out every layer's draws."""

    def __init__(self, seed: int, sparsity: float, mask_mode: str) -> None:
        super().__init__()
        self._generator = torch.Generator().manual_seed(int(seed))
        self._layer_args = {"sparsity": sparsity, "mask_mode": mask_mode}

    def linear(self, n_in: int, n_out: int) -> SupermaskLayer:
        return SupermaskLayer((n_out, n_in), F.linear, self._generator, **self._layer_args)

    def conv1d(self, c_in: int, c_out: int, kernel: int, stride: int = 1,
               padding: int = 0) -> SupermaskLayer:
        return SupermaskLayer((c_out, c_in, kernel), F.conv1d, self._generator,
                              stride=stride, padding=padding, **self._layer_args)

    def conv2d(self, c_in: int, c_out: int, kernel: int = 3, padding: int = 1) -> SupermaskLayer:
        return SupermaskLayer((c_out, c_in, kernel, kernel), F.conv2d, self._generator,
                              padding=padding, **self._layer_args)

    def mlp(self, sizes: Sequence[int]) -> nn.Sequential:
        """Flatten, then supermask linear layers through `sizes` with ReLUs between."""
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(self.linear(n_in, n_out))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)


def set_mask_mode(model: nn.Module, mask_mode: str) -> None:
    """Switch every supermask layer of `model` to `mask_mode`."""
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask-mode must be one of {MASK_MODES} (got {mask_mode!r})")
    for module in model.modules():
        if isinstance(module, SupermaskLayer):
            module.mask_mode = mask_mode


class SupermaskMLP(SupermaskNet):
    """The MLP of `fedsim.models.MLP` as a supermask network."""

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 hidden: Sequence[int] = (100, 100), seed: int = 0, sparsity: float = 0.5,
                 mask_mode: str = "reference") -> None:
        super().__init__(seed, sparsity, mask_mode)
        self.net = self.mlp([math.prod(input_shape), *hidden, num_classes])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SupermaskCNN1D(SupermaskNet):
    """The MNIST-1D CNN of `fedsim.models.CNN1D` as a supermask network."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: int = 25,
                 num_layers: int = 3, kernel_size: int = 5, seed: int = 0,
                 sparsity: float = 0.5, mask_mode: str = "reference") -> None:
        super().__init__(seed, sparsity, mask_mode)
        self.one_channel = len(input_shape) == 1
        in_channels = 1 if self.one_channel else int(input_shape[0])
        layers: list[nn.Module] = []
        for i in range(num_layers):
            c_in = in_channels if i == 0 else channels
            layers += [self.conv1d(c_in, channels, kernel_size, stride=2, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            n_flat = self.features(torch.zeros(1, in_channels, input_shape[-1])).numel()
        self.head = self.linear(n_flat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_channel:
            x = x.unsqueeze(1)
        return self.head(self.features(x).flatten(1))


class ConvStack(SupermaskNet):
    """Blocks of 3x3 convolutions, each block closed by a 2x2 max-pool, then a ReLU MLP.

    `blocks` lists each block's output channels per convolution.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 blocks: Sequence[Sequence[int]], hidden: Sequence[int], seed: int = 0,
                 sparsity: float = 0.5, mask_mode: str = "reference") -> None:
        super().__init__(seed, sparsity, mask_mode)
        c_in = int(input_shape[0])
        layers: list[nn.Module] = []
        for block in blocks:
            for c_out in block:
                layers += [self.conv2d(c_in, c_out), nn.ReLU()]
                c_in = c_out
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            n_flat = self.features(torch.zeros(1, *input_shape)).numel()
        self.head = self.mlp([n_flat, *hidden, num_classes])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def lenet(input_shape: Sequence[int], num_classes: int, **kwargs) -> ConvStack:
    """FRL's MNIST model: conv3x3(32), conv3x3(64), max-pool, linear 128, linear out."""
    return ConvStack(input_shape, num_classes, blocks=[(32, 64)], hidden=(128,), **kwargs)


def conv8(input_shape: Sequence[int], num_classes: int, **kwargs) -> ConvStack:
    """FRL's CIFAR-10 model: four blocks of two 3x3 convs (64 to 512), then 256-256-out."""
    return ConvStack(input_shape, num_classes,
                     blocks=[(64, 64), (128, 128), (256, 256), (512, 512)], hidden=(256, 256),
                     **kwargs)
