"""Per-FedAvg (Fallah, Mokhtari & Ozdaglar, NeurIPS 2020), first-order (FO) version.

The global model is trained as a MAML initialization: each local step draws two
batches, takes an inner step theta' = theta - alpha * grad f(theta; D) on the
first, and moves theta by the gradient at theta' on the second,
theta <- theta - beta * grad f(theta'; D'), the first-order approximation (no
Hessian). The server is FedAvg. To score a client, a copy of the received model
takes `eval_steps` steps of plain SGD at alpha on the client's training data
(one batch each), the personalization the method trains for; the received model
itself is reported as `global-*`.
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

Tensors = dict[str, torch.Tensor]


def first_order_step(params: Tensors, inner_grads: Tensors, outer_grad_at: Callable[
        [Tensors], Tensors], alpha: float, beta: float) -> Tensors:
    """One Per-FedAvg (FO) step: theta - beta * grad f(theta - alpha * inner_grads; D')."""
    inner = {k: p - alpha * inner_grads[k] for k, p in params.items()}
    outer = outer_grad_at(inner)
    return {k: p - beta * outer[k] for k, p in params.items()}


class PerFedAvgTrainer(SGDTrainer):
    """Per-FedAvg (FO) local training and one-step personalization at evaluation.

    Parameters beyond `SGDTrainer`'s (whose `lr` is the outer step beta; batches,
    epochs and weight decay as usual, plain SGD steps):
    - `inner_lr`: alpha, the inner (and evaluation) step size.
    - `eval_steps`: SGD steps of the evaluated copy on the client's data.

    A local epoch takes its batches in pairs (D, D'); a last unpaired batch is
    skipped.
    """

    def __init__(self, model_fn: Callable[[], nn.Module], inner_lr: float = 0.01,
                 eval_steps: int = 1, **kwargs) -> None:
        super().__init__(model_fn, **kwargs)
        require(is_number(inner_lr) and inner_lr >= 0, "client.inner_lr", "a number >= 0",
                inner_lr)
        require(is_int(eval_steps) and eval_steps >= 0, "client.eval_steps", "an integer >= 0",
                eval_steps)
        self.inner_lr = inner_lr
        self.eval_steps = eval_steps

    def gradients(self, model: nn.Module, params: Tensors, buffers: Tensors, x: torch.Tensor,
                  y: torch.Tensor) -> Tensors:
        """grad of the batch loss at `params`, plus this trainer's weight decay."""
        grads = gradients_at(model, params, buffers, x, y, self.batch_loss)
        if not self.weight_decay:
            return grads
        return {k: g + self.weight_decay * params[k].detach() for k, g in grads.items()}

    def train(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> TrainOutput:
        model = self.load_model(arrays)
        model.train()
        settings = self.round_settings(config)
        params = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
        buffers = dict(model.named_buffers())
        x, y = data.x_train.to(self.device), data.y_train.to(self.device)
        generator = self.generator(data, settings.server_round)
        steps = 0
        for _ in range(settings.local_epochs):
            batches = [b.to(self.device) for b in
                       minibatches(data.num_train, settings.batch_size, generator)]
            for first, second in zip(batches[::2], batches[1::2], strict=False):
                inner = self.gradients(model, params, buffers, x[first], y[first])
                params = first_order_step(
                    params, inner,
                    lambda at, b=second: self.gradients(model, at, buffers, x[b], y[b]),
                    self.inner_lr, settings.lr)
                steps += 1
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in params:
                    p.copy_(params[name])
        loss = self.batch_loss(predict(model, x, self.eval_batch_size), y).item() if len(y) else 0.0
        return TrainOutput(arrays=self.upload(model),
                           metrics={"train_loss": loss, NUM_EXAMPLES: data.num_train,
                                    "meta-steps": steps},
                           state=state)

    def evaluate(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> dict[str, float | int]:
        """The personalized copy's metrics (after `eval_steps` steps at alpha), and the
        received model's as `global-*`."""
        model = self.load_model(arrays)
        return personal_and_global(data, lambda: self.personalized_logits(model, config, data),
                                   lambda: predict(model, data.x_test, self.eval_batch_size))

    def personalized_logits(self, model: nn.Module, config: ConfigRecord, data: ClientData
                            ) -> torch.Tensor:
        """Test logits after `eval_steps` SGD steps at alpha from `model`'s weights (a copy)."""
        params, buffers = self.personalized_weights(model, config, data)
        return predict(model, data.x_test, self.eval_batch_size,
                       lambda xb: functional_call(model, {**params, **buffers}, (xb,)))

    def evaluated_weights(self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData,
                          state: RecordDict) -> dict[str, torch.Tensor]:
        """The one-step personalized weights the client's accuracy is scored with."""
        params, buffers = self.personalized_weights(self.load_model(arrays), config, data)
        return {**params, **buffers}

    def personalized_weights(self, model: nn.Module, config: ConfigRecord, data: ClientData
                             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Parameters after `eval_steps` SGD steps at alpha from `model`'s, and its buffers."""
        params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
        buffers = {k: b.clone() for k, b in model.named_buffers()}  # the received model's stay
        x, y = data.x_train.to(self.device), data.y_train.to(self.device)
        settings = self.round_settings(config)
        batches = minibatches(data.num_train, settings.batch_size,
                              self.generator(data, settings.server_round))
        for _, idx in zip(range(self.eval_steps), batches, strict=False):
            grads = self.gradients(model, params, buffers, x[idx], y[idx])
            params = {k: p - self.inner_lr * grads[k] for k, p in params.items()}
        return params, buffers
