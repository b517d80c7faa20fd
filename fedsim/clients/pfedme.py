"""pFedMe (T. Dinh, Tran & Nguyen, NeurIPS 2020): personalization by Moreau envelopes.

On each batch the client first approximately solves for its personalized model

    theta = argmin_theta f(theta; D) + lam/2 * ||theta - w||^2

by `personal_steps` gradient steps at `personal_lr` (from the current theta),
then moves its copy w of the global model toward it, w <- w - lr * lam * (w - theta).
w is uploaded; the server here is FedAvg, pFedMe's server step at beta = 1. The
last theta lives in the client's persistent state and is what the client is
scored with; the received model is reported as `global-*`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn
from torch.func import functional_call

from fedsim.clients.base import (
    NUM_EXAMPLES,
    TrainOutput,
    gradients_at,
    minibatches,
    personal_and_global,
    predict,
)
from fedsim.clients.sgd import SGDTrainer
from fedsim.datasets.federated import ClientData
from fedsim.errors import is_int, is_number, require

PERSONALIZED = "pfedme-personalized-model"  # key of theta in the client's state

Tensors = dict[str, torch.Tensor]


def moreau_step(theta: Tensors, w: Tensors, grads: Tensors, lam: float, lr: float) -> Tensors:
    """One gradient step on f(theta) + lam/2 ||theta - w||^2:
    theta - lr * (grad + lam * (theta - w))."""
    return {k: t - lr * (grads[k] + lam * (t - w[k])) for k, t in theta.items()}


def pull_toward(w: Tensors, theta: Tensors, lam: float, lr: float) -> Tensors:
    """pFedMe's local update of w: w - lr * lam * (w - theta)."""
    return {k: v - lr * lam * (v - theta[k]) for k, v in w.items()}


class PFedMeTrainer(SGDTrainer):
    """pFedMe's client (see the module). Parameters beyond `SGDTrainer`'s (whose `lr` is
    the step of w, the paper's eta):

    - `lam`: lambda, the Moreau-envelope weight (the paper: 15).
    - `personal_lr`: the step of theta's inner problem (the paper: 0.01 to 0.1).
    - `personal_steps`: K, gradient steps on theta per batch (the paper: 5).
    """

    def __init__(self, model_fn: Callable[[], nn.Module], lam: float = 15.0,
                 personal_lr: float = 0.01, personal_steps: int = 5, **kwargs) -> None:
        super().__init__(model_fn, **kwargs)
        require(is_number(lam) and lam >= 0, "client.lam", "a number >= 0", lam)
        require(is_number(personal_lr) and personal_lr >= 0, "client.personal_lr",
                "a number >= 0", personal_lr)
        require(is_int(personal_steps) and personal_steps >= 1, "client.personal_steps",
                "an integer >= 1", personal_steps)
        self.lam = lam
        self.personal_lr = personal_lr
        self.personal_steps = personal_steps

    def train(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> TrainOutput:
        model = self.load_model(arrays)
        model.train()
        settings = self.round_settings(config)
        w = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
        theta = {k: v.clone() for k, v in w.items()}
        buffers = dict(model.named_buffers())
        x, y = data.x_train.to(self.device), data.y_train.to(self.device)
        generator = self.generator(data, settings.server_round)
        for _ in range(settings.local_epochs):
            for idx in minibatches(data.num_train, settings.batch_size, generator):
                idx = idx.to(self.device)
                for _ in range(self.personal_steps):
                    grads = gradients_at(model, theta, buffers, x[idx], y[idx],
                                         self.batch_loss)
                    theta = moreau_step(theta, w, grads, self.lam, self.personal_lr)
                w = pull_toward(w, theta, self.lam, settings.lr)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in w:
                    p.copy_(w[name])
        loss = self.batch_loss(predict(model, x, self.eval_batch_size), y).item() if len(y) else 0.0
        new_state = RecordDict(dict(state.items()))
        new_state[PERSONALIZED] = ArrayRecord({**{k: t.cpu() for k, t in theta.items()},
                                               **{k: b.cpu() for k, b in buffers.items()}})
        return TrainOutput(arrays=self.upload(model),
                           metrics={"train_loss": loss, NUM_EXAMPLES: data.num_train},
                           state=new_state)

    def evaluate(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> dict[str, float | int]:
        """The personalized theta's metrics (the received model's until the client has one),
        and the received model's as `global-*`."""
        model = self.load_model(arrays)

        def received() -> torch.Tensor:
            return predict(model, data.x_test, self.eval_batch_size)

        def personal() -> torch.Tensor:
            if PERSONALIZED not in state:
                return received()
            theta = self.evaluated_weights(arrays, config, data, state)
            return predict(model, data.x_test, self.eval_batch_size,
                           lambda xb: functional_call(model, theta, (xb,)))

        return personal_and_global(data, personal, received)

    def evaluated_weights(self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData,
                          state: RecordDict) -> dict[str, torch.Tensor]:
        """The personalized theta (the received weights until the client has one)."""
        if PERSONALIZED not in state:
            return super().evaluated_weights(arrays, config, data, state)
        return {k: t.to(self.device) for k, t in state[PERSONALIZED].to_torch_state_dict().items()}
