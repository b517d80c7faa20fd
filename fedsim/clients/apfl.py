"""APFL (Deng, Kamani & Mahdavi, 2020): adaptive personalized federated learning.

Each client keeps a local model v and a mixing weight alpha in [0, 1]; its
personalized model is the mixture v_bar = alpha * v + (1 - alpha) * w of v and
the global model w. Each local step (on one batch):

1. w takes FedAvg's step on its own loss (w is what the client uploads);
2. v takes a step on the mixture's loss f(v_bar), whose gradient in v is
   alpha * grad f(v_bar) (w held fixed);
3. with `adapt_alpha`, alpha takes a step on f(v_bar) too, its gradient
   <v - w, grad f(v_bar)>, and is clipped to [0, 1].

v and alpha live in the client's persistent state (v starts as the received
model, alpha at `alpha`). Only trained parameters mix: normalization statistics
come from w (copies, so the mixed forward pass does not update w's). A client is
scored with its mixture of v and the received global model; the global model alone
is reported as `global-*`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn
from torch.func import functional_call

from fedsim.clients.base import (
    NUM_EXAMPLES,
    TrainOutput,
    minibatches,
    personal_and_global,
    predict,
)
from fedsim.clients.sgd import SGDTrainer
from fedsim.datasets.federated import ClientData
from fedsim.errors import is_number, require

LOCAL = "apfl-local-model"  # key of v in the client's state
MIXING = "apfl-alpha"  # key of alpha in the client's state

Tensors = dict[str, torch.Tensor]


def mixture(v: Tensors, w: Tensors, alpha: torch.Tensor | float,
            mixed: set[str] | None = None) -> Tensors:
    """alpha * v + (1 - alpha) * w for the entries in `mixed` (default: every floating
    one); the others (normalization statistics, counters) are copies of w's."""
    mixed = {k for k in w if w[k].is_floating_point()} if mixed is None else mixed
    return {k: alpha * v[k] + (1 - alpha) * w[k] if k in mixed else w[k].clone() for k in w}


def alpha_gradient(v: Tensors, w: Tensors, mixture_grad: Tensors) -> torch.Tensor:
    """d f(v_bar) / d alpha = sum over parameters of <v - w, grad f(v_bar)>."""
    return sum(((v[k] - w[k]) * g).sum() for k, g in mixture_grad.items())


class APFLTrainer(SGDTrainer):
    """`SGDTrainer` for the global model, plus APFL's local model and mixing weight.

    Parameters beyond `SGDTrainer`'s:
    - `alpha`: the initial mixing weight (the paper's experiments: 0.25 to 0.75).
    - `adapt_alpha`: learn alpha per client (APFL's adaptive variant); False keeps it.
    - `alpha_lr`: the step size of alpha (None: the client lr).

    The three updates share the batches and the lr (plain SGD steps for v and alpha;
    `optimizer` and momentum apply to w's updates only).
    """

    def __init__(self, model_fn: Callable[[], nn.Module], alpha: float = 0.5,
                 adapt_alpha: bool = True, alpha_lr: float | None = None, **kwargs) -> None:
        super().__init__(model_fn, **kwargs)
        require(is_number(alpha) and 0 <= alpha <= 1, "client.alpha", "a number in [0, 1]",
                alpha)
        require(isinstance(adapt_alpha, bool), "client.adapt_alpha", "true or false",
                adapt_alpha)
        require(alpha_lr is None or (is_number(alpha_lr) and alpha_lr >= 0), "client.alpha_lr",
                "a number >= 0, or null (the client lr)", alpha_lr)
        self.alpha = alpha
        self.adapt_alpha = adapt_alpha
        self.alpha_lr = alpha_lr

    def local_state(self, state: RecordDict, received: Tensors) -> tuple[Tensors, float]:
        """(v, alpha) from the client's state, else (the received model, `alpha`)."""
        if LOCAL not in state:
            return {k: t.clone() for k, t in received.items()}, float(self.alpha)
        return state[LOCAL].to_torch_state_dict(), float(state[MIXING]["alpha"])

    def train(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> TrainOutput:
        model = self.load_model(arrays)
        model.train()
        settings = self.round_settings(config)
        v_state, alpha = self.local_state(state, self.received_state())
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        v = {k: t.to(self.device).requires_grad_(k in names) for k, t in v_state.items()}
        a = torch.tensor(alpha, device=self.device, requires_grad=self.adapt_alpha)
        w_optimizer = self.make_optimizer([p for p in model.parameters() if p.requires_grad],
                                          settings)
        step, alpha_step = settings.lr, settings.lr if self.alpha_lr is None else self.alpha_lr
        x, y = data.x_train.to(self.device), data.y_train.to(self.device)
        generator = self.generator(data, settings.server_round)
        total, steps = 0.0, 0
        for _ in range(settings.local_epochs):
            for idx in minibatches(data.num_train, settings.batch_size, generator):
                idx = idx.to(self.device)
                w_optimizer.zero_grad(set_to_none=True)
                loss = self.objective(model, x[idx], y[idx])
                loss.backward()
                w = {k: t.detach() for k, t in model.state_dict().items()}
                mixed_loss = self.batch_loss(
                    functional_call(model, mixture(v, w, a, set(names)), (x[idx],)), y[idx])
                trainable = [v[n] for n in names] + ([a] if self.adapt_alpha else [])
                grads = torch.autograd.grad(mixed_loss, trainable)
                w_optimizer.step()  # w's step on its own loss (after v_bar used the old w)
                with torch.no_grad():
                    for name, grad in zip(names, grads, strict=False):
                        v[name] -= step * grad
                    if self.adapt_alpha:
                        a -= alpha_step * grads[-1]
                        a.clamp_(0.0, 1.0)
                total += loss.item()
                steps += 1
        new_state = RecordDict(dict(state.items()))
        new_state[LOCAL] = ArrayRecord({k: t.detach().cpu() for k, t in v.items()})
        new_state[MIXING] = MetricRecord({"alpha": float(a.item())})
        return TrainOutput(arrays=self.upload(model),
                           metrics={"train_loss": total / max(steps, 1),
                                    NUM_EXAMPLES: data.num_train, "alpha": float(a.item())},
                           state=new_state)

    def evaluate(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> dict[str, float | int]:
        """The personalized mixture's metrics, and the received global model's as `global-*`."""
        model = self.load_model(arrays)

        def received() -> torch.Tensor:
            return predict(model, data.x_test, self.eval_batch_size)

        def personal() -> torch.Tensor:
            if LOCAL not in state:
                return received()
            params = self.evaluated_weights(arrays, config, data, state)
            return predict(model, data.x_test, self.eval_batch_size,
                           lambda xb: functional_call(model, params, (xb,)))

        return personal_and_global(data, personal, received)

    def evaluated_weights(self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData,
                          state: RecordDict) -> dict[str, torch.Tensor]:
        """The mixture alpha * v + (1 - alpha) * w (the received w until the client has v)."""
        model = self.load_model(arrays)
        if LOCAL not in state:
            return super().evaluated_weights(arrays, config, data, state)
        v, alpha = self.local_state(state, self.received_state())
        w = {k: t.to(self.device) for k, t in self.received_state().items()}
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        return mixture({k: t.to(self.device) for k, t in v.items()}, w, alpha, trained)
