"""Mono-Forward: every layer learns its own classifier projection, forward only.

Paper: Gong et al. 2025, "Mono-Forward: Backpropagation-Free Algorithm for
Efficient Neural Network Training Harnessing Local Errors". Block i computes
a_i = act(W_i a_{i-1}.detach()) and owns a learned projection M_i (C x n_i); the
cross-entropy of `a_i M_i^T` updates W_i and M_i only. The network's classifier
is the last layer's projection: it trains on the detached last hidden
activation, and the prediction is the network's ordinary forward pass.

What is shared: the projections M_i of the hidden blocks live in the global
model (`WithAuxiliary.aux`), so they are uploaded and averaged with the weights.
Graph data has its own forward learner: `fedsim.clients.forward_gnn`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedsim.clients.local_learning import LayerLocalTrainer, WithAuxiliary, block_outputs
from fedsim.models import layer_blocks


def layer_projections(
    model: nn.Module, input_shape: tuple[int, ...], num_classes: int
) -> list[nn.Module]:
    """One learned projection (flattened activation -> C, no bias) per hidden block."""
    hidden = block_outputs(layer_blocks(model), input_shape)[:-1]
    return [nn.Linear(h[0].numel(), num_classes, bias=False) for h in hidden]


class MonoForwardTrainer(LayerLocalTrainer):
    """Layer-local cross-entropy through each hidden block's own learned projection.

    Parameters are those of `SGDTrainer`. The global model is the configured
    network plus one projection per hidden block (model=mlp, cnn1d or resmlp).
    """

    @classmethod
    def extend_model(
        cls,
        model: nn.Module,
        input_shape: tuple[int, ...],
        num_classes: int,
        options: Mapping[str, Any],
    ) -> nn.Module:
        """The network plus a projection M_i for each hidden block."""
        return WithAuxiliary(model, layer_projections(model, input_shape, num_classes))

    def local_loss(
        self, index: int, output: torch.Tensor, targets: torch.Tensor, aux: nn.ModuleList,
        num_classes: int,
    ) -> torch.Tensor:
        """Cross-entropy of the block's activation read out by its own projection."""
        return nn.functional.cross_entropy(aux[index](output.flatten(1)), targets)
