"""A cohort's local SGD as one vectorized computation (`backend.batched`).

Every client of a round runs the same steps as `SGDTrainer.train` on its own
shuffled minibatches, but the cohort's parameters are stacked along a leading
client axis and each step is one `torch.func.vmap` over clients of the model's
gradient (`functional_call`). Batches are padded to the batch size and masked,
so a client's loss is the mean over its real samples; a client with fewer steps
than the longest sits still (parameters and momentum kept) while the others go on.
The arithmetic is the sequential trainer's: only the order of float32 sums differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

#: leaf modules whose forward pass is a deterministic function of input and weights:
#: the only ones a batched cohort trains (dropout draws, batch norm keeps running stats)
DETERMINISTIC_LAYERS = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh,
    nn.Sigmoid, nn.SiLU, nn.ELU, nn.Softplus, nn.Flatten, nn.Unflatten, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.LayerNorm, nn.Embedding,
)


@dataclass(frozen=True)
class SGDRule:
    """torch.optim.SGD's update, as the sequential trainer runs it (no dampening, no
    Nesterov), and FedProx's proximal weight `mu` (0 = plain SGD)."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    mu: float = 0.0


def model_problem(model: nn.Module) -> str | None:
    """Why `model` cannot be trained as a batched cohort, or None when it can: buffers
    (batch norm statistics), tied or frozen parameters, or a layer outside
    `DETERMINISTIC_LAYERS`. Randomness in a container's own `forward` is not seen here:
    `vmap` refuses it when the cohort runs, and the clients then train one by one."""
    if any(True for _ in model.buffers()):
        return f"the model {type(model).__name__} has buffers (e.g. batch norm statistics)"
    if len(list(model.named_parameters(remove_duplicate=False))) != len(
            list(model.named_parameters())):
        return f"the model {type(model).__name__} ties weights (one parameter, two names)"
    if not all(p.requires_grad for p in model.parameters()):
        return f"the model {type(model).__name__} has frozen parameters"
    for name, module in model.named_modules():
        if not any(True for _ in module.children()) and not isinstance(
                module, DETERMINISTIC_LAYERS):
            return f"its layer '{name}' ({type(module).__name__}) is not known to be deterministic"
    return None


def padded_steps(batches: Sequence[Sequence[torch.Tensor]], offsets: Sequence[int],
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per step and client, the rows of the cohort's concatenated data and their weights.

    `batches[c]` is client c's list of minibatch indices (into its own data) in the
    order it trains them; `offsets[c]` is where its data starts in the concatenation.
    Returns `rows` (T, C, B) int64, `weights` (T, C, B) with 1/len(batch) on real rows
    and 0 on padding, and `active` (T, C) bool: whether client c has a step t.
    """
    steps, clients = max((len(b) for b in batches), default=0), len(batches)
    rows = torch.zeros(steps, clients, batch_size, dtype=torch.int64)
    weights = torch.zeros(steps, clients, batch_size)
    active = torch.zeros(steps, clients, dtype=torch.bool)
    for c, client_batches in enumerate(batches):
        for t, idx in enumerate(client_batches):
            n = len(idx)
            rows[t, c, :n] = idx + offsets[c]
            weights[t, c, :n] = 1.0 / n
            active[t, c] = n > 0
    return rows, weights, active


def cohort_sgd(
    model: nn.Module,
    starts: Sequence[dict[str, torch.Tensor]],
    x: torch.Tensor,
    y: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    active: torch.Tensor,
    rule: SGDRule,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each client's SGD from its own start weights, all clients in one computation.

    `starts[c]` holds client c's initial parameters (the model's names); `x`, `y`
    the cohort's concatenated data; `rows`, `weights`, `active` from `padded_steps`.
    Returns the trained parameters stacked along a leading client axis, and each
    client's summed step loss (cross-entropy plus the proximal term, as the
    sequential trainer adds them up) and step count in a (C, 2) tensor.
    """
    names = list(starts[0])
    params = {k: torch.stack([s[k] for s in starts]).detach() for k in names}
    anchor = {k: v.clone() for k, v in params.items()}
    momentum: dict[str, torch.Tensor] | None = None
    totals = torch.zeros(len(starts), 2, device=x.device)

    def loss(p: dict[str, torch.Tensor], a: dict[str, torch.Tensor], xb: torch.Tensor,
             yb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        per_sample = nn.functional.cross_entropy(functional_call(model, p, (xb,)), yb,
                                                 reduction="none")
        value = (per_sample * wb).sum()
        if rule.mu > 0:
            value = value + rule.mu / 2 * sum((p[k] - a[k]).pow(2).sum() for k in p)
        return value

    step = vmap(grad_and_value(loss))
    for t in range(rows.shape[0]):
        grads, losses = step(params, anchor, x[rows[t]], y[rows[t]], weights[t])
        on = active[t]
        momentum = sgd_update(params, grads, momentum, on, rule)
        totals[:, 0] += torch.where(on, losses.detach(), 0.0)
        totals[:, 1] += on.float()
    return params, totals


def sgd_update(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
               momentum: dict[str, torch.Tensor] | None, on: torch.Tensor, rule: SGDRule
               ) -> dict[str, torch.Tensor] | None:
    """One step of torch.optim.SGD on every active client's parameters (in place); the
    others keep theirs. Returns the momentum buffers (None without momentum)."""
    new_momentum = {}
    for k, p in params.items():
        g = grads[k]
        if rule.weight_decay:
            g = g.add(p, alpha=rule.weight_decay)
        if rule.momentum:
            if momentum is None or k not in momentum:
                buf = g.clone()  # torch's first step: the buffer is the gradient itself
            else:
                buf = momentum[k].mul(rule.momentum).add_(g)
                buf = torch.where(_along(on, buf), buf, momentum[k])
            new_momentum[k] = buf
            g = buf
        p.copy_(torch.where(_along(on, p), p.add(g, alpha=-rule.lr), p))
    return new_momentum if rule.momentum else None


def _along(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (C,) mask shaped to broadcast over a (C, ...) tensor."""
    return mask.view(-1, *([1] * (like.dim() - 1)))
