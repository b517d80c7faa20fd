"""FedNova's client (Wang et al., NeurIPS 2020): SGD that reports its normalizing factor.

Training is `SGDTrainer`'s; the reply adds `fednova-a`, the factor a_i by which
the server divides this client's change (`fedsim.strategies.fednova`). For tau
steps of SGD with momentum rho the change is a weighted sum of the tau
gradients, gradient t (from 1) counting (1 - rho^(tau - t + 1)) / (1 - rho)
times; a_i is the sum of those weights, which is tau for plain SGD.
"""

from __future__ import annotations

import math

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim.clients.base import TrainOutput
from fedsim.clients.sgd import SGDTrainer, require_sgd
from fedsim.datasets.federated import ClientData
from fedsim.spec import RunSpec
from fedsim.strategies.fednova import FACTOR, UPLOADS_WEIGHTS_AND_FACTOR


def normalizing_factor(steps: int, momentum: float = 0.0) -> float:
    """a = sum_{t=1..tau} (1 - rho^t) / (1 - rho) = (tau - rho (1 - rho^tau) / (1 - rho))
    / (1 - rho); tau for rho = 0."""
    if momentum == 0:
        return float(steps)
    return (steps - momentum * (1 - momentum**steps) / (1 - momentum)) / (1 - momentum)


class FedNovaTrainer(SGDTrainer):
    """`SGDTrainer` whose reply carries a_i (`fednova-a`) for FedNova's server.

    tau is the minibatch steps taken, `local_epochs * ceil(num_train / batch_size)`;
    the factor assumes SGD with this trainer's momentum at one lr within the round.
    """

    uploads = UPLOADS_WEIGHTS_AND_FACTOR

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        """a_i counts SGD (momentum) steps."""
        require_sgd(spec, "FedNova's normalizing factor")

    def train(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> TrainOutput:
        out = super().train(arrays, config, data, state)
        settings = self.round_settings(config)
        steps = settings.local_epochs * math.ceil(data.num_train / settings.batch_size)
        out.metrics[FACTOR] = normalizing_factor(steps, self.momentum)
        return out
