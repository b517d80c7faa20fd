"""MOON (Li, He & Song, CVPR 2021): model-contrastive federated learning.

Each local step adds to the cross-entropy a contrastive term on the
representation z (the classifier's input): z should be closer, in cosine
similarity over a temperature, to the received global model's representation
z_glob of the same batch than to the client's previous local model's z_prev:

    l_con = -log( exp(sim(z, z_glob) / tau) / (exp(sim(z, z_glob) / tau)
                                               + exp(sim(z, z_prev) / tau)) )

and the loss is CE + mu * l_con. The previous local model lives in the client's
persistent state (a client's first round uses the received model). The server
is FedAvg. fedsim's networks have no separate projection head: z is the
features the classifier reads (`fedsim.models.features`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn
from torch.nn import functional as F

from fedsim.clients.base import TrainOutput
from fedsim.clients.sgd import SGDTrainer
from fedsim.datasets.federated import ClientData
from fedsim.errors import is_number, require
from fedsim.models import captured_features, features

PREVIOUS = "moon-previous-model"  # key of the client's previous local model in its state


def model_contrastive_loss(z: torch.Tensor, z_global: torch.Tensor, z_previous: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """MOON's l_con, averaged over the batch: cross-entropy of the global model's
    representation as the positive against the previous local model's as the negative."""
    positive = F.cosine_similarity(z, z_global, dim=1) / temperature
    negative = F.cosine_similarity(z, z_previous, dim=1) / temperature
    logits = torch.stack([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long, device=z.device))


class MoonTrainer(SGDTrainer):
    """`SGDTrainer` with MOON's model-contrastive term (see the module).

    Parameters beyond `SGDTrainer`'s:
    - `mu`: weight of the contrastive term (the paper: 5 on CIFAR-10, 1 on CIFAR-100 and
      Tiny-ImageNet).
    - `temperature`: tau of the cosine similarities (the paper's 0.5).
    """

    def __init__(self, model_fn: Callable[[], nn.Module], mu: float = 1.0,
                 temperature: float = 0.5, **kwargs) -> None:
        super().__init__(model_fn, **kwargs)
        require(is_number(mu) and mu >= 0, "client.mu", "a number >= 0", mu)
        require(is_number(temperature) and temperature > 0, "client.temperature",
                "a number > 0", temperature)
        self.mu = mu
        self.temperature = temperature
        self._frozen: dict[str, nn.Module] = {}
        self._global: nn.Module | None = None  # this round's frozen global model
        self._previous: nn.Module | None = None  # and the previous local one

    def frozen(self, name: str, state: dict[str, torch.Tensor]) -> nn.Module:
        """A frozen copy of the model (`name`: global or previous) holding `state`."""
        if name not in self._frozen:  # built once per process, off the seeded stream
            with torch.random.fork_rng(devices=[]):
                self._frozen[name] = self.model_fn().to(self.device)
        model = self._frozen[name]
        model.load_state_dict(state)
        return model.eval().requires_grad_(False)

    def train(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> TrainOutput:
        self.load_model(arrays)
        received = self.received_state()
        previous = state[PREVIOUS].to_torch_state_dict() if PREVIOUS in state else received
        self._global = self.frozen("global", received)
        self._previous = self.frozen("previous", previous)
        out = super().train(arrays, config, data, state)
        new_state = RecordDict(dict(out.state.items()))
        new_state[PREVIOUS] = out.arrays  # the trained weights: next round's previous model
        return TrainOutput(arrays=out.arrays, metrics=out.metrics, state=new_state,
                           records=out.records)

    def objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """CE + mu * l_con, the representations read in the same forward passes."""
        with captured_features(model) as captured:
            logits = model(x)
        loss = self.batch_loss(logits, y)
        if self.mu == 0:
            return loss
        with torch.no_grad():
            z_global = features(self._global, x)
            z_previous = features(self._previous, x)
        return loss + self.mu * model_contrastive_loss(captured[-1], z_global, z_previous,
                                                       self.temperature)
