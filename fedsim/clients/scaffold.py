"""SCAFFOLD's client (Karimireddy et al., ICML 2020): drift-corrected local SGD.

The received ArrayRecord holds the global model and the server's control variate
`c` (keys prefixed by `fedsim.strategies.scaffold.CONTROL`). Every local step
follows the gradient corrected by `c - c_i`, done here by adding the linear term
<c - c_i, w> to the loss (its gradient is exactly the correction, for any
optimizer). After K steps at lr eta the client's variate is refreshed by the
paper's option II, c_i+ = c_i - c + (x - y_i) / (K * eta), kept in the client's
persistent state, and the upload is the trained weights `y_i` plus
`c_i+ - c_i` under the control keys. Entries that are not trained parameters
(buffers) carry a zero variate.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedsim.clients.base import NUM_EXAMPLES, TrainOutput
from fedsim.clients.sgd import SGDTrainer, require_sgd
from fedsim.datasets.federated import ClientData
from fedsim.spec import RunSpec
from fedsim.strategies.scaffold import UPLOADS_WEIGHTS_AND_CONTROL, split_control, with_control

CLIENT_CONTROL = "scaffold-client-control"  # key of c_i in the client's state

Tensors = dict[str, torch.Tensor]


def correction_term(params: dict[str, torch.Tensor], c: Tensors, c_i: Tensors) -> torch.Tensor:
    """sum over parameters of <c - c_i, w>: its gradient in w is the drift correction."""
    return sum(((c[name] - c_i[name]) * p).sum() for name, p in params.items())


def option_two(c_i: np.ndarray, c: np.ndarray, x: np.ndarray, y: np.ndarray, steps: int,
               lr: float) -> np.ndarray:
    """The paper's option II: c_i+ = c_i - c + (x - y_i) / (K * eta)."""
    return c_i - c + (x - y) / (steps * lr)


class ScaffoldTrainer(SGDTrainer):
    """`SGDTrainer` with SCAFFOLD's corrected steps and client control variate.

    Parameters are `SGDTrainer`'s. Option II assumes plain SGD at a constant lr
    within the round (momentum 0, no cosine), as in the paper; K counts the
    minibatch steps taken, `local_epochs * ceil(num_train / batch_size)`.
    """

    uploads = UPLOADS_WEIGHTS_AND_CONTROL

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        """Option II divides by K * eta, which assumes SGD steps."""
        require_sgd(spec, "SCAFFOLD's option II")

    def train(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> TrainOutput:
        received = {key: array.numpy() for key, array in arrays.items()}
        global_model, c_np = split_control(received)
        model = self.load_model(ArrayRecord({k: arrays[k] for k in global_model}))
        model.train()
        settings = self.round_settings(config)
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        c_i_np = client_control(state, c_np)
        c = {name: torch.as_tensor(c_np[name], device=self.device) for name in params}
        c_i = {name: torch.as_tensor(c_i_np[name], device=self.device) for name in params}
        x, y = data.x_train.to(self.device), data.y_train.to(self.device)

        def loss_of(idx: torch.Tensor) -> torch.Tensor:
            return self.objective(model, x[idx], y[idx]) + correction_term(params, c, c_i)

        train_loss = self.sgd_epochs(list(params.values()), data, settings, loss_of)
        steps = settings.local_epochs * math.ceil(data.num_train / settings.batch_size)
        trained = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        new_c_i = {key: (option_two(c_i_np[key], c_np[key], global_model[key], trained[key],
                                    steps, settings.lr)
                         if key in params and settings.lr > 0 and steps > 0
                         else c_i_np[key]).astype(c_np[key].dtype)
                   for key in c_np}
        change = {key: new_c_i[key] - c_i_np[key] for key in c_np}
        new_state = RecordDict(dict(state.items()))
        new_state[CLIENT_CONTROL] = ArrayRecord({k: Array(v) for k, v in new_c_i.items()})
        upload = with_control(trained, change)
        return TrainOutput(
            arrays=ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in upload.items()}),
            metrics={"train_loss": train_loss, NUM_EXAMPLES: data.num_train},
            state=new_state,
        )


def client_control(state: RecordDict, c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The client's c_i from its state, or zeros the first time (same keys as `c`)."""
    if CLIENT_CONTROL in state:
        return {key: array.numpy() for key, array in state[CLIENT_CONTROL].items()}
    return {key: np.zeros_like(value) for key, value in c.items()}
