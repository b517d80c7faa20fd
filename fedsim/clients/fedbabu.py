"""FedBABU (Oh, Kim & Yun, ICLR 2022): train the body only, fine-tune at evaluation.

During federated training the classifier (the model's last linear layer) stays
at its random initialization on every client, so the shared body learns a
representation for a fixed head; only the body trains and is averaged. To score
a client, a copy of the received model is fine-tuned, body and head, for
`finetune_epochs` on the client's training data; the received model itself is
reported as `global-*` (before fine-tuning).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from fedsim.clients.base import NUM_EXAMPLES, TrainOutput, personal_and_global, predict
from fedsim.clients.sgd import SGDTrainer
from fedsim.datasets.federated import ClientData
from fedsim.errors import is_int, require
from fedsim.models import classifier_layer


def body_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters outside the classifier."""
    head = {id(p) for p in classifier_layer(model).parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in head]


class FedBABUTrainer(SGDTrainer):
    """`SGDTrainer` that trains the body alone and fine-tunes everything to evaluate.

    Parameters beyond `SGDTrainer`'s:
    - `finetune_epochs`: epochs of whole-model fine-tuning before a client is scored
      (same lr, batch size and optimizer as training; the paper's default: 5).
    """

    def __init__(self, model_fn: Callable[[], nn.Module], finetune_epochs: int = 5,
                 **kwargs) -> None:
        super().__init__(model_fn, **kwargs)
        require(is_int(finetune_epochs) and finetune_epochs >= 0, "client.finetune_epochs",
                "an integer >= 0", finetune_epochs)
        self.finetune_epochs = finetune_epochs
        self._tuned: nn.Module | None = None

    def train(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> TrainOutput:
        model = self.load_model(arrays)
        model.train()
        x, y = data.x_train.to(self.device), data.y_train.to(self.device)
        loss = self.sgd_epochs(body_parameters(model), data, self.round_settings(config),
                               lambda idx: self.objective(model, x[idx], y[idx]))
        return TrainOutput(arrays=self.upload(model),
                           metrics={"train_loss": loss, NUM_EXAMPLES: data.num_train},
                           state=state)

    def tuned_copy(self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData
                   ) -> nn.Module:
        """A copy of the received model fine-tuned, body and head, on the training data."""
        self.load_model(arrays)
        if self._tuned is None:  # built once per process, off the seeded stream
            with torch.random.fork_rng(devices=[]):
                self._tuned = self.model_fn().to(self.device)
        model = self._tuned
        model.load_state_dict(self.received_state())
        self.fine_tune(model, config, data, self.finetune_epochs)
        return model

    def evaluated_weights(self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData,
                          state: RecordDict) -> dict[str, torch.Tensor]:
        """FedBABU's own fine-tuned copy (a further fine-tune starts from it)."""
        return {k: t.clone() for k, t in self.tuned_copy(arrays, config, data).state_dict().items()}

    def evaluate(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> dict[str, float | int]:
        """The fine-tuned copy's metrics, and the received model's as `global-*`."""
        return personal_and_global(
            data,
            lambda: predict(self.tuned_copy(arrays, config, data), data.x_test,
                            self.eval_batch_size),
            lambda: predict(self.load_model(arrays), data.x_test, self.eval_batch_size))
