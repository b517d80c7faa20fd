"""FedLoGe's client (Xiao et al., ICLR 2024): SSE-C backbone, auxiliary and local heads.

The global model is any fedsim network whose last linear layer serves as the
auxiliary global head `g_aux`. Each batch:

- the backbone (everything before that layer) trains against SSE-C, a frozen
  sparse equiangular tight frame built from the run seed on every client;
- `g_aux` and the client's own local head `l_k` train on the detached features.

The client uploads backbone + `g_aux` (the model's state); `l_k` is persistent
client state and never leaves the client. At evaluation the client realigns its
heads (GLA-FR, Euclidean norm transfer): logits = l_k(f) + W_hat_k f + b_aux with
W_hat_k[c] = ||l_k[c]|| * g_aux[c], classes the client never trained on masked.
The server half (averaging, generic-head realignment) is
`fedsim.strategies.fedloge.FedLoGe`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from fedsim.clients.base import TrainOutput, predict
from fedsim.clients.sgd import SGDTrainer
from fedsim.datasets.federated import ClientData
from fedsim.errors import ConfigError, is_int, is_number, require
from fedsim.etf import sparse_etf
from fedsim.metrics import (
    NUM_EXAMPLES,
    classification_metrics,
    mask_absent_classes,
    prefixed,
)
from fedsim.models import classifier_layer, features
from fedsim.spec import RunSpec
from fedsim.strategies.fedloge import check_classifier_is_last

LOCAL_HEAD = "fedloge-local-head"  # key of the local head in the client's state


def norm_transfer(local_weight: torch.Tensor, aux_weight: torch.Tensor) -> torch.Tensor:
    """GLA-FR for a client: every g_aux row rescaled to the norm of the local head's row."""
    return local_weight.norm(dim=1, keepdim=True) * aux_weight


def personalized_logits(
    feats: torch.Tensor, local_head: dict[str, torch.Tensor], aux_head: dict[str, torch.Tensor]
) -> torch.Tensor:
    """l_k(f) + W_hat_k f + b_aux, heads given as `weight` (K, d) and `bias` (K,) tensors."""
    realigned = norm_transfer(local_head["weight"], aux_head["weight"])
    return feats @ (local_head["weight"] + realigned).T + local_head["bias"] + aux_head["bias"]


def fresh_head(in_features: int, out_features: int, generator: torch.Generator) -> nn.Linear:
    """A linear head with nn.Linear's default init range, drawn from `generator`."""
    head = nn.utils.skip_init(nn.Linear, in_features, out_features)  # no global RNG draw
    bound = 1.0 / math.sqrt(in_features)
    with torch.no_grad():
        for tensor in (head.weight, head.bias):
            tensor.copy_(torch.empty_like(tensor).uniform_(-bound, bound, generator=generator))
    return head


class FedLoGeTrainer(SGDTrainer):
    """FedLoGe's local training: backbone vs SSE-C, g_aux and local head on detached features.

    Defaults are the reference's: SGD lr 0.03, momentum 0.5, batch 8, 5 local
    epochs. The three losses touch disjoint parameters, so one SGD step on their
    sum equals the reference's three optimizers stepping one loss each.

    Parameters beyond `SGDTrainer`'s:
    - `etf_sparsity`, `etf_norm`, `etf_steps`, `etf_lr`: SSE-C (`sparse_etf`), built
      once per process from the run seed. `etf_norm` defaults to 1.0, not the
      reference's 0.1 (tuned for ResNet + BatchNorm): against class vectors of
      norm 0.1 an unnormalized ReLU backbone grows its features to norm ~100,
      and the heads' SGD on those features diverges.
    - `mask_absent_classes`: at evaluation, rule out the classes absent from the
      client's *training* set. The reference masks by its *test* labels; that
      score is reported too, as `reference-*`.
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        seed: int = 0,
        lr: float = 0.03,
        momentum: float = 0.5,
        local_epochs: int = 5,
        batch_size: int = 8,
        etf_sparsity: float = 0.6,
        etf_norm: float = 1.0,
        etf_steps: int = 2000,
        etf_lr: float = 1e-3,
        mask_absent_classes: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(
            model_fn, seed, lr=lr, momentum=momentum, local_epochs=local_epochs,
            batch_size=batch_size, **kwargs,
        )
        require(is_number(etf_sparsity) and 0 <= etf_sparsity < 1, "client.etf_sparsity",
                "a number in [0, 1)", etf_sparsity)
        for name, value in (("etf_norm", etf_norm), ("etf_lr", etf_lr)):
            require(is_number(value) and value > 0, f"client.{name}", "a number > 0", value)
        require(is_int(etf_steps) and etf_steps >= 0, "client.etf_steps", "an integer >= 0",
                etf_steps)
        require(isinstance(mask_absent_classes, bool), "client.mask_absent_classes",
                "true or false", mask_absent_classes)
        self.etf_sparsity = etf_sparsity
        self.etf_norm = etf_norm
        self.etf_steps = etf_steps
        self.etf_lr = etf_lr
        self.mask_absent_classes = mask_absent_classes
        self._etf: dict[tuple[int, int], torch.Tensor] = {}

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        """SSE-C's ETF needs at least as many features as classes; client and server
        find the same head."""
        width = classifier_layer(spec.model).in_features
        if width < spec.num_classes:
            raise ConfigError(
                f"model: FedLoGe's SSE-C needs the classifier's input width >= the "
                f"{spec.num_classes} classes (model {spec.cfg.model._target_} has {width}); "
                "widen the layer before the head"
            )
        check_classifier_is_last(spec)

    def sse_c(self, feature_dim: int, num_classes: int) -> torch.Tensor:
        """The frozen SSE-C for this run (built on first use, then kept)."""
        key = (feature_dim, num_classes)
        if key not in self._etf:
            etf = sparse_etf(
                feature_dim, num_classes, self.seed, self.etf_sparsity, self.etf_norm,
                self.etf_steps, self.etf_lr,
            )
            self._etf[key] = etf.to(self.device)
        return self._etf[key]

    def local_head(self, state: RecordDict, aux_head: nn.Linear, data: ClientData) -> nn.Linear:
        """The client's local head from its state, or a fresh one (seeded by client)."""
        head = fresh_head(aux_head.in_features, aux_head.out_features, self.generator(data, 0))
        if LOCAL_HEAD in state:
            head.load_state_dict(state[LOCAL_HEAD].to_torch_state_dict())
        return head.to(self.device)

    def train(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> TrainOutput:
        model = self.load_model(arrays)
        model.train()
        aux_head = classifier_layer(model)
        local_head = self.local_head(state, aux_head, data)
        etf = self.sse_c(aux_head.in_features, aux_head.out_features)
        x, y = data.x_train.to(self.device), data.y_train.to(self.device)
        cross_entropy = nn.functional.cross_entropy

        def loss_of(idx: torch.Tensor) -> torch.Tensor:
            feats = features(model, x[idx])
            detached = feats.detach()
            return (
                cross_entropy(feats @ etf, y[idx])  # backbone only: SSE-C is frozen
                + cross_entropy(aux_head(detached), y[idx])
                + cross_entropy(local_head(detached), y[idx])
            )

        parameters = [p for p in model.parameters() if p.requires_grad]
        parameters += list(local_head.parameters())
        train_loss = self.sgd_epochs(parameters, data, self.round_settings(config), loss_of)
        new_state = RecordDict(dict(state.items()))
        new_state[LOCAL_HEAD] = ArrayRecord(local_head.state_dict())
        return TrainOutput(
            arrays=ArrayRecord(model.state_dict()),
            metrics={"train_loss": train_loss, NUM_EXAMPLES: data.num_train},
            state=new_state,
        )

    def evaluate(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> dict[str, float | int]:
        """Local metrics under fedsim's rule (`test_logits`), plus `reference-*` under the
        reference code's: classes absent from the client's *test* labels masked."""
        if len(data.y_test) == 0:
            raw = torch.zeros(0, data.num_classes)
        else:
            raw = self.personalized_test_logits(arrays, data, state)
        metrics = classification_metrics(self._masked(raw, data), data.y_test, data.class_groups)
        reference = mask_absent_classes(raw, data.y_test)  # the scorer reads the test labels
        return metrics | prefixed(
            classification_metrics(reference, data.y_test, data.class_groups), "reference-")

    def test_logits(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> torch.Tensor:
        """Personalized logits, classes the client never trained on masked (by default)."""
        return self._masked(self.personalized_test_logits(arrays, data, state), data)

    def personalized_test_logits(
        self, arrays: ArrayRecord, data: ClientData, state: RecordDict
    ) -> torch.Tensor:
        """Unmasked personalized logits: the local head plus g_aux realigned to its row norms.

        A client that has not trained yet has no local head: it is scored with g_aux
        alone (the global model), not with an untrained head.
        """
        model = self.load_model(arrays)
        aux_head = classifier_layer(model)
        feats = predict(model, data.x_test, self.eval_batch_size, partial(features, model))
        aux = _cpu_tensors(aux_head)
        if LOCAL_HEAD not in state:
            return feats @ aux["weight"].T + aux["bias"]
        local = _cpu_tensors(self.local_head(state, aux_head, data))
        return personalized_logits(feats, local, aux)

    def _masked(self, logits: torch.Tensor, data: ClientData) -> torch.Tensor:
        return mask_absent_classes(logits, data.y_train) if self.mask_absent_classes else logits


def _cpu_tensors(head: nn.Linear) -> dict[str, torch.Tensor]:
    """A linear layer's weight and bias, detached, on the CPU."""
    return {"weight": head.weight.detach().cpu(), "bias": head.bias.detach().cpu()}
