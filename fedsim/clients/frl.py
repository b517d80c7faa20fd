"""FRL's client (Mozaffari et al., USENIX Security 2023): train edge scores, send rankings.

The client starts from the global scores of a supermask network, trains them
with SGD (weights stay frozen), and sends back, for every layer, the ranking
of its edges: the edge ids sorted by score, least important first. Rankings
travel as the narrowest unsigned integer type that holds an edge id, never as
floats; the server votes on them (`fedsim.strategies.frl`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from fedsim.clients.base import UPLOADS_RANKINGS, TrainOutput
from fedsim.clients.sgd import SGDTrainer
from fedsim.datasets.federated import ClientData
from fedsim.errors import ConfigError, require
from fedsim.spec import RunSpec
from fedsim.supermask import SupermaskLayer, set_mask_mode


def ranking_dtype(num_edges: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every edge id of a layer."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_edges - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def ranking(scores: torch.Tensor) -> np.ndarray:
    """Edge ids sorted by score, ascending (least important first), as unsigned integers.

    Ties are broken by edge id (a stable sort), so the ranking is a function of the scores.
    """
    order = torch.argsort(scores.detach().flatten().cpu(), stable=True).numpy()
    return order.astype(ranking_dtype(order.size))


def rankings(model: nn.Module) -> ArrayRecord:
    """One ranking per state entry (for a supermask network: per layer's scores)."""
    return ArrayRecord({key: Array(ranking(value)) for key, value in model.state_dict().items()})


class FRLTrainer(SGDTrainer):
    """SGD on the scores of a supermask network; uploads integer rankings.

    Defaults follow the FRL reference: lr 0.4 decayed by 0.999 a round, momentum 0.9,
    weight decay 1e-4, cosine annealing over the local epochs, batch 8, 2 epochs
    (MNIST; the reference uses 5 on CIFAR-10). The mask mode the server sends
    (`mask-mode`) is applied to the model before training and evaluation.
    """

    uploads = UPLOADS_RANKINGS

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        """Rankings are of a supermask network's scores: any other model has none."""
        if not any(isinstance(m, SupermaskLayer) for m in spec.model.modules()):
            raise ConfigError(
                f"model must be a supermask network for client {spec.cfg.client._target_} "
                f"(got {spec.cfg.model._target_}); use model=supermask_mlp, supermask_cnn1d, "
                "lenet or conv8"
            )

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        seed: int = 0,
        lr: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        local_epochs: int = 2,
        batch_size: int = 8,
        proximal_mu: float = 0.0,
        lr_decay: float = 0.999,
        cosine_epochs: bool = True,
        eval_batch_size: int = 1024,
        device: str = "auto",
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    ) -> None:
        # Accepted (client/sgd.yaml sets it for every client) but only as 0: no FedProx term.
        require(proximal_mu == 0, "client.proximal_mu",
                "0 for FRL (it trains scores, not weights)", proximal_mu)
        super().__init__(
            model_fn, seed, lr=lr, momentum=momentum, weight_decay=weight_decay,
            local_epochs=local_epochs, batch_size=batch_size, lr_decay=lr_decay,
            cosine_epochs=cosine_epochs, eval_batch_size=eval_batch_size, device=device,
            optimizer=optimizer,
        )

        self._mask_mode: str | None = None  # the mode of the message being served

    def load_model(self, arrays: ArrayRecord) -> nn.Module:
        """The model with the received scores, in the mask mode the server asked for."""
        model = super().load_model(arrays)
        if self._mask_mode is not None:
            set_mask_mode(model, self._mask_mode)
        return model

    def train(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> TrainOutput:
        self._mask_mode = _mask_mode(config)
        return super().train(arrays, config, data, state)

    def evaluate(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> dict[str, float | int]:
        self._mask_mode = _mask_mode(config)
        return super().evaluate(arrays, config, data, state)

    def upload(self, model: nn.Module) -> ArrayRecord:
        """Per layer, the edges ranked by the trained scores (integers)."""
        return rankings(model)


def _mask_mode(config: ConfigRecord) -> str | None:
    """The `mask-mode` a message carries (FRL's strategy sends it), if any."""
    return str(config["mask-mode"]) if "mask-mode" in config else None
