"""FedAvg + FT: the usual personalized baseline, a global model whose head each client fine-tunes.

Training is plain SGD (`SGDTrainer`), so the global model is FedAvg's. At
evaluation each client fine-tunes a copy of the classifier (the model's last
linear layer) on its own training set, with the backbone frozen, and evaluates
that: the "local accuracy" of FedAvg with fine-tuned local heads. The same
evaluation also reports the global model as received (`global-*` metrics), so
one run gives FedAvg's local accuracy with and without fine-tuning.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from fedsim.clients.base import predict
from fedsim.clients.sgd import SGDTrainer
from fedsim.datasets.federated import ClientData
from fedsim.errors import is_int, require
from fedsim.metrics import classification_metrics, mask_absent_classes, prefixed
from fedsim.models import classifier_layer, features


class FineTuneTrainer(SGDTrainer):
    """`SGDTrainer` whose evaluation fine-tunes the head on the client's training data first.

    Parameters beyond `SGDTrainer`'s:
    - `finetune_epochs`: epochs of head-only SGD at evaluation (same lr, momentum,
      batch size as training; 0 evaluates the global model as is).
    - `mask_absent_classes`: rule out the classes absent from the client's training
      set, as FedLoGe's local evaluation does, so the two compare like for like
      (both the fine-tuned and the `global-*` metrics). The `reference-*` metrics
      are never masked, as the reference FedLoGe code scores FedAvg.
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        finetune_epochs: int = 5,
        mask_absent_classes: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(model_fn, **kwargs)
        require(is_int(finetune_epochs) and finetune_epochs >= 0, "client.finetune_epochs",
                "an integer >= 0", finetune_epochs)
        require(isinstance(mask_absent_classes, bool), "client.mask_absent_classes",
                "true or false", mask_absent_classes)
        self.finetune_epochs = finetune_epochs
        self.mask_absent_classes = mask_absent_classes

    def evaluate(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> dict[str, float | int]:
        """The fine-tuned head's metrics, plus `global-loss` / `global-accuracy*` of the
        received model (no fine-tuning; the same class mask), and both unmasked as the
        reference FedLoGe code scores FedAvg (`reference-*`, `reference-global-*`)."""
        if len(data.y_test) == 0:
            received = tuned = torch.zeros(0, data.num_classes)
        else:
            received, tuned = self.received_and_tuned_logits(arrays, config, data)
        metrics = classification_metrics(self._masked(tuned, data), data.y_test,
                                         data.class_groups)
        for prefix, logits in (("global-", self._masked(received, data)),
                               ("reference-", tuned), ("reference-global-", received)):
            metrics |= prefixed(classification_metrics(logits, data.y_test, data.class_groups),
                                prefix)
        return metrics

    def test_logits(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> torch.Tensor:
        """Logits of the global backbone with a head fine-tuned on the client's training set."""
        return self._masked(self.received_and_tuned_logits(arrays, config, data)[1], data)

    def received_and_tuned_logits(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Test logits (unmasked) of the received head and of a copy fine-tuned on the
        training set. Both read the same frozen backbone features, computed once.
        """
        model = self.load_model(arrays)
        head = copy.deepcopy(classifier_layer(model))
        read_features = partial(features, model)
        test_feats = predict(model, data.x_test, self.eval_batch_size, read_features)
        test_feats = test_feats.to(self.device)
        with torch.no_grad():
            received = head(test_feats).cpu()
        train_feats = predict(model, data.x_train, self.eval_batch_size, read_features)
        train_feats = train_feats.to(self.device)
        y = data.y_train.to(self.device)

        def loss_of(idx: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(head(train_feats[idx]), y[idx])

        self.sgd_epochs(list(head.parameters()), data, self.round_settings(config), loss_of,
                        self.finetune_epochs)
        with torch.no_grad():
            return received, head(test_feats).cpu()

    def _masked(self, logits: torch.Tensor, data: ClientData) -> torch.Tensor:
        return mask_absent_classes(logits, data.y_train) if self.mask_absent_classes else logits
