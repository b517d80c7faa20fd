"""FedLD's client: margin-controlled local training, uploading deltas.

Paper: Zeng et al., MICCAI 2024 (arXiv 2408.12300). Each batch minimizes
cross-entropy plus `lam * log(1 + ||softmax(z)||_F^2)`, which penalizes
over-confident predictions and so shrinks the "distribution-shift loss" between
clients. The server half is `fedsim.strategies.fedld.FedLD`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.clients.base import UPLOADS_DELTAS
from fedsim.clients.sgd import SGDTrainer
from fedsim.errors import is_number, require


def margin_penalty(logits: torch.Tensor) -> torch.Tensor:
    """log(1 + ||P||_F^2), P = softmax(logits) the whole (B, C) probability matrix."""
    return torch.log1p(torch.softmax(logits, dim=1).pow(2).sum())


def margin_loss(logits: torch.Tensor, targets: torch.Tensor, lam: float) -> torch.Tensor:
    """FedLD's local objective: CE(z, y) + lam * log(1 + ||softmax(z)||_F^2)."""
    return nn.functional.cross_entropy(logits, targets) + lam * margin_penalty(logits)


class FedLDTrainer(SGDTrainer):
    """Minibatch SGD on FedLD's margin loss; uploads `w_local - w_global` for every entry.

    Parameters are those of `SGDTrainer` plus `lam`, the weight of the margin
    term (paper default 0.03; the reference command uses 0.1). Deltas cover
    parameters and buffers alike (BatchNorm statistics, step counters), and the
    model trains in train mode (the reference's eval-mode BatchNorm is a side
    effect of its evaluation order and is not copied).
    """

    uploads = UPLOADS_DELTAS

    def __init__(self, model_fn: Callable[[], nn.Module], lam: float = 0.03, **kwargs) -> None:
        super().__init__(model_fn, **kwargs)
        require(is_number(lam) and lam >= 0, "client.lam", "a number >= 0", lam)
        self.lam = lam

    def batch_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy plus the margin-control term."""
        return margin_loss(logits, targets, self.lam)

    def upload(self, model: nn.Module) -> ArrayRecord:
        """The local update of every state entry, against the received global weights."""
        received = self.received_state()
        return ArrayRecord(
            OrderedDict(
                (key, value.detach().cpu() - received[key])
                for key, value in model.state_dict().items()
            )
        )
