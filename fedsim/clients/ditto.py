"""Ditto (Li et al., ICML 2021): a personal model held near the global one.

Each round a selected client does FedAvg's local update of the received global
model `w` (uploaded as usual; the server is plain FedAvg), then trains its own
personal model `v` on its data with the proximal term `lam/2 * ||v - w||^2` to
the *received* global model: each step follows grad F(v) + lam * (v - w). `v`
lives in the client's persistent state and is what the client is scored with.
lam = 0 is purely local training; a large lam keeps `v` at the global model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from fedsim.clients.base import TrainOutput, personal_and_global, predict
from fedsim.clients.sgd import SGDTrainer, proximal_term
from fedsim.datasets.federated import ClientData
from fedsim.errors import is_int, is_number, require

PERSONAL = "ditto-personal-model"  # key of the personal model in the client's state


def personal_objective(loss: torch.Tensor, model: nn.Module, anchor: list[torch.Tensor],
                       lam: float) -> torch.Tensor:
    """Ditto's personal loss: F(v) + lam/2 * ||v - w||^2, `anchor` the received global w."""
    return loss + lam / 2 * proximal_term(model, anchor) if lam > 0 else loss


class DittoTrainer(SGDTrainer):
    """`SGDTrainer` for the global update, plus Ditto's personal model (see the module).

    Parameters beyond `SGDTrainer`'s:
    - `lam`: the proximal weight lambda (the paper tunes it over {0.05, ..., 2}).
    - `personal_epochs`: epochs of the personal update per round (None: `local_epochs`),
      same lr, batch size and optimizer as the global update.

    A client's first round starts its personal model from the received global
    model. Evaluation scores the personal model (the global one while a client
    has none yet) and also reports the received global model as `global-*`.
    """

    def __init__(self, model_fn: Callable[[], nn.Module], lam: float = 0.1,
                 personal_epochs: int | None = None, **kwargs) -> None:
        super().__init__(model_fn, **kwargs)
        require(is_number(lam) and lam >= 0, "client.lam", "a number >= 0", lam)
        require(personal_epochs is None or (is_int(personal_epochs) and personal_epochs >= 1),
                "client.personal_epochs", "an integer >= 1, or null (local_epochs)",
                personal_epochs)
        self.lam = lam
        self.personal_epochs = personal_epochs
        self._personal: nn.Module | None = None

    def train(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> TrainOutput:
        out = super().train(arrays, config, data, state)  # the global update, uploaded
        received = self.received_state()
        personal = self.personal_model(state, received)
        personal.train()
        anchor = [received[name].to(self.device) for name, _ in personal.named_parameters()]
        settings = self.round_settings(config)
        x, y = data.x_train.to(self.device), data.y_train.to(self.device)

        def loss_of(idx: torch.Tensor) -> torch.Tensor:
            loss = self.batch_loss(personal(x[idx]), y[idx])
            return personal_objective(loss, personal, anchor, self.lam)

        trainable = [p for p in personal.parameters() if p.requires_grad]
        self.sgd_epochs(trainable, data, settings, loss_of, self.personal_epochs)
        new_state = RecordDict(dict(out.state.items()))
        new_state[PERSONAL] = ArrayRecord(personal.state_dict())
        return TrainOutput(arrays=out.arrays, metrics=out.metrics, state=new_state,
                           records=out.records)

    def personal_model(self, state: RecordDict, received: dict[str, torch.Tensor]) -> nn.Module:
        """The client's personal model from its state, else `received` (the global model)."""
        if self._personal is None:  # built once per process, off the seeded stream
            with torch.random.fork_rng(devices=[]):
                self._personal = self.model_fn().to(self.device)
        source = state[PERSONAL].to_torch_state_dict() if PERSONAL in state else received
        self._personal.load_state_dict(source)
        return self._personal

    def evaluate(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> dict[str, float | int]:
        """The personal model's metrics, and the received global model's as `global-*`."""
        return personal_and_global(
            data, lambda: self.test_logits(arrays, config, data, state),
            lambda: predict(self.load_model(arrays), data.x_test, self.eval_batch_size))

    def evaluated_weights(self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData,
                          state: RecordDict) -> dict[str, torch.Tensor]:
        """The personal model (the received global model before the client has one)."""
        if PERSONAL not in state:
            return super().evaluated_weights(arrays, config, data, state)
        return dict(self.personal_model(state, {}).state_dict())

    def test_logits(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> torch.Tensor:
        """The personal model's logits (the received global model's before it has one)."""
        if PERSONAL not in state:
            return super().test_logits(arrays, config, data, state)
        return predict(self.personal_model(state, {}), data.x_test, self.eval_batch_size)
