"""Personalized FL by a split of the model into shared and personal entries.

One trainer, three splits (`personal`), each a published method:

- `head`: FedPer (Arivazhagan et al., 2019): the classifier (the model's last
  linear layer) stays on the client, the body is shared;
- `body`: LG-FedAvg (Liang et al., 2020): the body stays on the client, the
  classifier is shared;
- `norm`: FedBN (Li et al., ICLR 2021): normalization layers (their weights and
  running statistics) stay on the client.

`FedRepTrainer` is FedRep (Collins et al., ICML 2021): FedPer's split, each round
training the personal head first with the body frozen, then the body with the
head frozen.

A client replaces the personal entries of the received model by its own (kept
in its persistent state, taken from the first model it receives), trains, keeps
the new personal entries and uploads the whole model, so any weight-averaging
strategy runs unchanged: the personal entries it averages never reach a client.
The bytes metered are therefore the whole model's, more than these methods need
to send. Evaluation scores the personalized model and reports the received
global model as `global-*`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from fedsim.clients.base import TrainOutput, personal_and_global, predict
from fedsim.clients.sgd import SGDTrainer
from fedsim.datasets.federated import ClientData
from fedsim.errors import ConfigError, is_int, require
from fedsim.metrics import NUM_EXAMPLES
from fedsim.models import classifier_layer
from fedsim.spec import RunSpec

PERSONAL_ENTRIES = "personal-entries"  # key of the client's own entries in its state
#: The normalization layers FedBN keeps local.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def module_keys(model: nn.Module, modules: list[nn.Module]) -> set[str]:
    """The state-dict keys of `modules` (parameters and buffers) inside `model`."""
    names = {id(module): name for name, module in model.named_modules()}
    return {f"{names[id(m)]}.{key}" if names[id(m)] else key
            for m in modules for key in m.state_dict()}


def personal_keys(model: nn.Module, personal: str) -> set[str]:
    """The entries a client keeps for itself: the classifier's (`head`), all but the
    classifier's (`body`), or the normalization layers' (`norm`)."""
    head = module_keys(model, [classifier_layer(model)])
    if personal == "head":
        return head
    if personal == "body":
        return set(model.state_dict()) - head
    return module_keys(model, [m for m in model.modules() if isinstance(m, NORM_LAYERS)])


def personalized(received: dict[str, torch.Tensor], own: dict[str, torch.Tensor] | None
                 ) -> dict[str, torch.Tensor]:
    """The received entries, with the client's own in place of its personal ones."""
    return {**received, **(own or {})}


class PersonalPartTrainer(SGDTrainer):
    """`SGDTrainer` that keeps part of the model on the client (see the module).

    Parameters beyond `SGDTrainer`'s:
    - `personal`: which entries stay local: "head" (FedPer), "body" (LG-FedAvg) or
      "norm" (FedBN).
    """

    SPLITS = ("head", "body", "norm")

    def __init__(self, model_fn: Callable[[], nn.Module], personal: str = "head",
                 **kwargs) -> None:
        super().__init__(model_fn, **kwargs)
        require(personal in self.SPLITS, "client.personal", f"one of {list(self.SPLITS)}",
                personal)
        self.personal = personal
        self._keys: list[str] | None = None  # the personal entries' names (`personal_keys`)

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        """FedBN needs normalization layers to keep local."""
        if spec.cfg.client.get("personal") == "norm" and not any(
                isinstance(m, NORM_LAYERS) for m in spec.model.modules()):
            raise ConfigError(
                f"client.personal: 'norm' keeps normalization layers local, and model "
                f"{spec.cfg.model._target_} has none (use e.g. model=resmlp or resnet18)")

    def personal_arrays(self, arrays: ArrayRecord, state: RecordDict) -> ArrayRecord:
        """The received arrays with this client's personal entries (if it has any yet)."""
        if PERSONAL_ENTRIES not in state:
            return arrays
        own = state[PERSONAL_ENTRIES].to_torch_state_dict()
        return ArrayRecord(personalized(arrays.to_torch_state_dict(), own))

    def train(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> TrainOutput:
        out = self.train_personalized(self.personal_arrays(arrays, state), config, data, state)
        if self._keys is None:  # the split depends on the architecture only: found once
            self._keys = sorted(personal_keys(self._model, self.personal))
        trained = out.arrays.to_torch_state_dict()
        new_state = RecordDict(dict(out.state.items()))
        new_state[PERSONAL_ENTRIES] = ArrayRecord({k: trained[k] for k in self._keys})
        return TrainOutput(arrays=out.arrays, metrics=out.metrics, state=new_state,
                           records=out.records)

    def train_personalized(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> TrainOutput:
        """One round of local training from the personalized arrays (plain SGD here)."""
        return super().train(arrays, config, data, state)

    def evaluated_weights(self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData,
                          state: RecordDict) -> dict[str, torch.Tensor]:
        """The received weights with this client's personal entries."""
        return self.personal_arrays(arrays, state).to_torch_state_dict()

    def test_logits(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> torch.Tensor:
        """The personalized model's logits."""
        return super().test_logits(self.personal_arrays(arrays, state), config, data, state)

    def evaluate(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> dict[str, float | int]:
        """The personalized model's metrics, and the received global model's as `global-*`."""
        return personal_and_global(
            data, lambda: self.test_logits(arrays, config, data, state),
            lambda: predict(self.load_model(arrays), data.x_test, self.eval_batch_size))


class FedRepTrainer(PersonalPartTrainer):
    """FedRep: the head stays local; each round trains it `head_epochs` epochs with the body
    frozen, then the body `local_epochs` epochs with the head frozen.

    Parameters beyond `SGDTrainer`'s: `head_epochs` (the paper's head updates; default 10).
    """

    def __init__(self, model_fn: Callable[[], nn.Module], head_epochs: int = 10,
                 **kwargs) -> None:
        super().__init__(model_fn, personal="head", **kwargs)
        require(is_int(head_epochs) and head_epochs >= 1, "client.head_epochs",
                "an integer >= 1", head_epochs)
        self.head_epochs = head_epochs

    def train_personalized(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> TrainOutput:
        model = self.load_model(arrays)
        model.train()
        settings = self.round_settings(config)
        head = {id(p) for p in classifier_layer(model).parameters()}
        x, y = data.x_train.to(self.device), data.y_train.to(self.device)

        def loss_of(idx: torch.Tensor) -> torch.Tensor:
            return self.objective(model, x[idx], y[idx])

        trainable = [p for p in model.parameters() if p.requires_grad]
        self.sgd_epochs([p for p in trainable if id(p) in head], data, settings, loss_of,
                        self.head_epochs)
        loss = self.sgd_epochs([p for p in trainable if id(p) not in head], data, settings,
                               loss_of)
        return TrainOutput(arrays=self.upload(model),
                           metrics={"train_loss": loss, NUM_EXAMPLES: data.num_train},
                           state=state)
