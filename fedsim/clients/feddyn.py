"""FedDyn's client (Acar et al., ICLR 2021): local loss with the dynamic regularizer.

Minimizes L_i(w) - <g_i, w> + alpha/2 * ||w - x||^2 from the received global model
x, alpha sent by the server (`fedsim.strategies.feddyn`), then updates its gradient
state g_i <- g_i - alpha * (y_i - x), kept in the client's persistent state.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim.clients.base import NUM_EXAMPLES, TrainOutput
from fedsim.clients.sgd import SGDTrainer, proximal_term
from fedsim.datasets.federated import ClientData
from fedsim.errors import MessageError, is_number
from fedsim.strategies.feddyn import ALPHA, UPLOADS_FEDDYN_WEIGHTS

GRADIENT_STATE = "feddyn-gradient"  # key of g_i in the client's state


def linear_term(model: torch.nn.Module, gradient: dict[str, torch.Tensor]) -> torch.Tensor:
    """<g_i, w> over the trainable parameters."""
    return sum((gradient[name] * p).sum() for name, p in model.named_parameters()
               if p.requires_grad)


def updated_gradient(gradient: torch.Tensor, trained: torch.Tensor, received: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """g_i - alpha * (y_i - x)."""
    return gradient - alpha * (trained - received)


class FedDynTrainer(SGDTrainer):
    """`SGDTrainer` on FedDyn's regularized local loss (see the module); `proximal_mu` is
    not used (alpha plays its part). Pair with strategy=feddyn, which sends alpha."""

    uploads = UPLOADS_FEDDYN_WEIGHTS

    def train(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> TrainOutput:
        alpha = config.get(ALPHA)
        if not (is_number(alpha) and alpha > 0):
            raise MessageError(f"the server's train config must carry '{ALPHA}' > 0 (got "
                               f"{alpha!r}); use strategy=feddyn")
        model = self.load_model(arrays)
        model.train()
        received = {k: v.to(self.device) for k, v in self.received_state().items()}
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        gradient = ({k: v.to(self.device) for k, v in
                     state[GRADIENT_STATE].to_torch_state_dict().items()}
                    if GRADIENT_STATE in state else
                    {name: torch.zeros_like(p) for name, p in params.items()})
        anchor = [received[name] for name, _ in model.named_parameters()]
        x, y = data.x_train.to(self.device), data.y_train.to(self.device)

        def loss_of(idx: torch.Tensor) -> torch.Tensor:
            loss = self.objective(model, x[idx], y[idx]) - linear_term(model, gradient)
            return loss + alpha / 2 * proximal_term(model, anchor)

        loss = self.sgd_epochs(list(params.values()), data, self.round_settings(config),
                               loss_of)
        new_gradient = {name: updated_gradient(gradient[name], p.detach(), received[name],
                                               alpha).cpu() for name, p in params.items()}
        new_state = RecordDict(dict(state.items()))
        new_state[GRADIENT_STATE] = ArrayRecord(new_gradient)
        return TrainOutput(arrays=self.upload(model),
                           metrics={"train_loss": loss, NUM_EXAMPLES: data.num_train},
                           state=new_state)
