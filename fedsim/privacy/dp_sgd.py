"""DP-SGD in a client's trainer (Opacus): the training side of `privacy=local`.

Each step draws a Poisson batch (every sample with probability `q = batch / n`),
clips every sample's gradient to `max_grad_norm` and adds N(0, (noise * max_grad_norm)^2)
to their sum before dividing by the expected batch size: DP-SGD (Abadi et al. 2016)
as Opacus implements it (`GradSampleModule`, `DPOptimizer`). The client reports the
rate, steps and noise it really used (`dp-sample-rate`, `dp-steps`, `dp-noise`) for the
server's accounting (`fedsim.privacy.local`). Opacus is imported when a run trains.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from fedsim.errors import is_number, require

SAMPLE_RATE = "dp-sample-rate"
STEPS = "dp-steps"
NOISE = "dp-noise"

BatchLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def poisson_batch(n: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson sample of `range(n)`: each one in with probability `rate`."""
    return torch.nonzero(torch.rand(n, generator=generator) < rate).flatten()


class DPSGD:
    """The DP-SGD settings a trainer trains with (module docstring). A plain class, not a
    dataclass: Hydra would turn a dataclass argument of the trainer into a config."""

    def __init__(self, noise_multiplier: float, max_grad_norm: float) -> None:
        require(is_number(noise_multiplier) and noise_multiplier > 0,
                "privacy.noise_multiplier", "a number > 0", noise_multiplier)
        require(is_number(max_grad_norm) and max_grad_norm > 0,
                "privacy.max_grad_norm", "a number > 0", max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)

    def train(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
              y: torch.Tensor, *, batch_size: int, epochs: int, generator: torch.Generator,
              batch_loss: BatchLoss) -> tuple[float, dict[str, float]]:
        """`epochs` epochs of DP-SGD on (x, y), each of `round(n / batch_size)` Poisson
        steps; returns the mean batch loss and the accounting metrics of what ran.

        `batch_loss` is the trainer's mean loss; the per-sample gradients are of the
        summed loss, as DP-SGD's clipping needs. `model` is left without Opacus's hooks.
        """
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        n = len(y)
        if n == 0:  # nothing to train on: no step, nothing released
            return 0.0, {SAMPLE_RATE: 1.0, STEPS: 0, NOISE: self.noise_multiplier}
        rate = min(1.0, batch_size / n)
        steps_per_epoch = max(1, round(n / batch_size))
        noise_generator = torch.Generator(device=x.device)
        noise_generator.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        sampled = GradSampleModule(model, loss_reduction="sum")
        private = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                              max_grad_norm=self.max_grad_norm,
                              expected_batch_size=max(1, round(rate * n)),
                              loss_reduction="mean", generator=noise_generator)
        loss_sum, steps = 0.0, 0
        with warnings.catch_warnings():
            # the inputs need no gradient, so torch says the hooks see only module outputs
            warnings.filterwarnings("ignore", "Full backward hook is firing")
            try:
                for _ in range(epochs * steps_per_epoch):
                    idx = poisson_batch(n, rate, generator).to(x.device)
                    private.zero_grad(set_to_none=True)
                    logits = sampled(x[idx])
                    loss = (batch_loss(logits, y[idx]) * len(idx) if len(idx)
                            else logits.sum() * 0)  # an empty batch: noise alone, still a step
                    loss.backward()
                    private.step()
                    loss_sum += loss.item() / max(len(idx), 1)
                    steps += 1
            finally:
                sampled._close()
        return loss_sum / max(steps, 1), {SAMPLE_RATE: rate, STEPS: steps,
                                          NOISE: self.noise_multiplier}
