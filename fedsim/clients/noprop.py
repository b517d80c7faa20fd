"""NoProp-DT: "Training Neural Networks without Back-propagation or Forward-propagation"
(Li, Teh & Pascanu, 2025), discrete-time variant.

T blocks u_t(z_{t-1}, x), t = 1..T, each a small complete network, learn to denoise
a noisy label embedding towards the clean one. Label embeddings live in
`NoPropDT.embed` (C x d); the noise process is q(z_t | y) = N(sqrt(abar_t) u_y,
(1 - abar_t) I) with a cosine schedule, abar_0 = 0 (pure noise) rising to abar_T
close to 1. Training samples each block's input z_{t-1} from q(z_{t-1} | y), not
from block t-1, so the blocks train independently; inference starts from
z_0 ~ N(0, I) and steps through the blocks with the Gaussian posterior of the
noise process, then a linear classifier reads z_T.

The schedule math is in small pure functions (`cosine_alpha_bar`, `snr`,
`posterior_coefficients`, `gaussian_kl`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from fedsim.clients.sgd import SGDTrainer
from fedsim.errors import ConfigError

COSINE_OFFSET = 0.008  # the s of the cosine schedule (Nichol & Dhariwal, 2021)
EVAL_NOISE_SEED = 20250319  # inference noise: the same draws on every call and every party


def cosine_alpha_bar(num_steps: int, offset: float = COSINE_OFFSET) -> torch.Tensor:
    """abar_t for t = 0..T (T + 1 values, float64): cos^2(pi/2 (1 - t/T + s) / (1 + s)).

    abar_0 is set to exactly 0 (z_0 is pure noise); the values rise to abar_T < 1.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    alpha_bar = torch.cos(math.pi / 2 * (1 - s + offset) / (1 + offset)) ** 2
    alpha_bar[0] = 0.0
    return alpha_bar


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio abar / (1 - abar) of each step (0 at abar = 0)."""
    return alpha_bar / (1 - alpha_bar)


def posterior_coefficients(
    alpha_bar: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a_t, b_t, c_t) for t = 1..T (index t - 1) of q(z_t | z_{t-1}, u_y) = N(a u + b z, c I).

    With alpha_t = abar_{t-1} / abar_t:
    a_t = sqrt(abar_t) (1 - alpha_t) / (1 - abar_{t-1}),
    b_t = sqrt(alpha_t) (1 - abar_t) / (1 - abar_{t-1}),
    c_t = (1 - abar_t) (1 - alpha_t) / (1 - abar_{t-1}).
    At t = 1 (abar_0 = 0) this is (sqrt(abar_1), 0, 1 - abar_1): z_1 ignores z_0.
    """
    previous, current = alpha_bar[:-1], alpha_bar[1:]
    alpha = previous / current
    a = current.sqrt() * (1 - alpha) / (1 - previous)
    b = alpha.sqrt() * (1 - current) / (1 - previous)
    c = (1 - current) * (1 - alpha) / (1 - previous)
    return a, b, c


def gaussian_kl(mean: torch.Tensor, variance: float) -> torch.Tensor:
    """KL(N(mean, variance I) || N(0, I)) per row of `mean`: 1/2 (|m|^2 + d v - d - d log v)."""
    dim = mean.shape[-1]
    return 0.5 * (mean.pow(2).sum(-1) + dim * (variance - 1 - math.log(variance)))


class DenoisingBlock(nn.Module):
    """u_t(z, x): encoders of x and z, fused layers -> C logits -> softmax -> @ W_embed."""

    def __init__(self, in_features: int, embed_dim: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.x_encoder = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU())
        self.z_encoder = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU())
        self.fused = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, z: torch.Tensor, x: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.x_encoder(x), self.z_encoder(z)], dim=-1)
        return self.fused(h).softmax(dim=-1) @ embed


class NoPropDT(nn.Module):
    """NoProp-DT's network: T denoising blocks, class embeddings and a linear classifier.

    `forward(x)` is inference, and takes no labels: z_0 ~ N(0, I) from the model's
    own generator, seeded with a fixed constant on every call (evaluation is
    reproducible and the same on every party), then z_t = a_t u_t(z_{t-1}, x) +
    b_t z_{t-1} + sqrt(c_t) eps (no noise at the last step), and the classifier's
    logits on z_T. Training never calls it: `NoPropTrainer` trains each block on
    inputs sampled from the noise process.

    The class embeddings W_embed (C x d, d = C) start as the identity (one-hot
    labels). By default they are a fixed buffer (still in the state dict, so
    FedAvg averages identical copies); `learn_embeddings` makes them a parameter
    trained by every block's loss, the classifier's CE and the KL term. The noise
    schedule is kept in non-persistent buffers: it follows the model's device but
    is never uploaded.

    Parameters
    ----------
    input_shape : Sequence[int]
        Shape of one sample (flattened by each block's input encoder).
    num_classes : int
        C, also the embedding dimension d.
    num_blocks : int
        T, the number of denoising blocks (diffusion steps).
    hidden : int
        Width of each block's encoders and fused layers.
    learn_embeddings : bool
        Train the class embeddings (initialized to the identity) instead of fixing them.
    """

    trained_by = "fedsim.clients.noprop.NoPropTrainer"  # backprop through the chain is not NoProp

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        num_blocks: int = 10,
        hidden: int = 128,
        learn_embeddings: bool = False,
    ) -> None:
        super().__init__()
        if not (isinstance(num_blocks, int) and num_blocks >= 1):
            raise ConfigError(f"model.num_blocks must be an integer >= 1 (got {num_blocks})")
        if not (isinstance(hidden, int) and hidden >= 1):
            raise ConfigError(f"model.hidden must be an integer >= 1 (got {hidden})")
        if not isinstance(learn_embeddings, bool):
            raise ConfigError(
                f"model.learn_embeddings must be true or false (got {learn_embeddings})"
            )
        in_features = math.prod(input_shape)
        embed_dim = num_classes
        self.num_classes = num_classes
        self.num_blocks = num_blocks
        embed = torch.eye(num_classes, embed_dim)
        if learn_embeddings:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        self.blocks = nn.ModuleList(
            DenoisingBlock(in_features, embed_dim, num_classes, hidden) for _ in range(num_blocks)
        )
        self.classifier = nn.Linear(embed_dim, num_classes)
        alpha_bar = cosine_alpha_bar(num_blocks)
        a, b, c = posterior_coefficients(alpha_bar)
        for name, value in [("alpha_bar", alpha_bar), ("snr", snr(alpha_bar)),
                            ("coef_a", a), ("coef_b", b), ("coef_c", c)]:
            self.register_buffer(name, value.float(), persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.embed.shape[1]

    def denoise(self, t: int, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Block t's (1..T) prediction u_t(z_{t-1}, x) of the clean label embedding."""
        return self.blocks[t - 1](z, x, self.embed)

    def sample_noisy(self, t: int, y: torch.Tensor) -> torch.Tensor:
        """z_t ~ q(z_t | y) = N(sqrt(abar_t) u_y, (1 - abar_t) I), from torch's global RNG."""
        u_y = self.embed[y]
        noise = torch.randn(u_y.shape, device=u_y.device, dtype=u_y.dtype)
        return self.alpha_bar[t].sqrt() * u_y + (1 - self.alpha_bar[t]).sqrt() * noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the reverse chain started at noise; no label is read.

        The noise generator restarts from a fixed seed on every call, so a batch is
        reproducible on any party; a sample's noise depends on its row in the batch.
        """
        generator = torch.Generator(device=x.device).manual_seed(EVAL_NOISE_SEED)
        shape = (x.shape[0], self.embed_dim)

        def noise() -> torch.Tensor:
            return torch.randn(shape, generator=generator, device=x.device,
                               dtype=self.embed.dtype)

        z = noise()
        for t in range(1, self.num_blocks + 1):
            u = self.denoise(t, z, x)
            z = self.coef_a[t - 1] * u + self.coef_b[t - 1] * z
            if t < self.num_blocks:
                z = z + self.coef_c[t - 1].sqrt() * noise()
        return self.classifier(z)


class NoPropTrainer(SGDTrainer):
    """NoProp-DT's local training: each block learns to denoise on its own.

    Per minibatch, for t = 1..T: z_{t-1} ~ q(z_{t-1} | y) (a sample, so no gradient
    reaches any other block), loss_t = (T / 2) eta (SNR(t) - SNR(t-1)) *
    mean_batch ||u_t(z_{t-1}, x) - u_y||^2, backpropagated at once (one block's
    graph alive at a time); then CE(classifier(z_T), y) with z_T ~ q(z_T | y),
    plus KL(q(z_0 | y) || N(0, I)) (0 with abar_0 = 0; it only matters for other
    schedules), backpropagated together. With learned embeddings the gradient
    reaches them through the targets u_y, the blocks' outputs (softmax @ W_embed),
    and the sample z_T seen by the classifier; block inputs z_{t-1} are detached.
    The objective returns the detached sum of these losses (the `train_loss`).

    The SNR weights span orders of magnitude (with T = 10 and the cosine schedule,
    ~0.01 for block 1 to ~3000 for block T). Adam(W) normalizes each parameter's
    step, so the per-block scale mostly does not matter and every block learns;
    with plain SGD one lr cannot suit them all: the early blocks barely move (or
    the late ones diverge). Use `optimizer=adamw` (the paper's; fedsim/conf/client/noprop
    selects it). Uploads the trained weights (every block, the classifier, the
    embeddings); the optimizer state restarts every round, as in SGDTrainer.

    Parameters
    ----------
    model_fn : Callable[[], nn.Module]
        Builds a `NoPropDT`.
    eta : float
        Weight of the denoising losses (paper: 0.1).
    **kwargs
        The SGDTrainer settings (lr, weight_decay, local_epochs, batch_size, optimizer, ...).
    """

    required_model = "fedsim.clients.noprop.NoPropDT"

    def __init__(self, model_fn: Callable[[], nn.Module], eta: float = 0.1, **kwargs) -> None:
        if not (isinstance(eta, int | float) and eta > 0):
            raise ConfigError(f"client.eta must be a number > 0 (got {eta})")
        super().__init__(model_fn, **kwargs)
        self.eta = eta

    def block_loss(self, model: NoPropDT, t: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Block t's (1..T) weighted denoising loss; its graph reaches block t alone."""
        z = model.sample_noisy(t - 1, y).detach()
        u_y = model.embed[y]
        weight = model.num_blocks / 2 * self.eta * (model.snr[t] - model.snr[t - 1])
        error = (model.denoise(t, z, x) - u_y).pow(2).sum(-1).mean()
        return weight * error

    def output_loss(self, model: NoPropDT, y: torch.Tensor) -> torch.Tensor:
        """CE of the classifier on z_T ~ q(z_T | y), plus KL(q(z_0 | y) || N(0, I))."""
        z_last = model.sample_noisy(model.num_blocks, y)
        ce = nn.functional.cross_entropy(model.classifier(z_last), y)
        alpha_bar_0 = float(model.alpha_bar[0])
        kl = gaussian_kl(math.sqrt(alpha_bar_0) * model.embed[y], 1 - alpha_bar_0).mean()
        return ce + kl

    def losses(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> Iterator[torch.Tensor]:
        """Each block's loss, then the output loss; the caller backpropagates each in turn."""
        if not isinstance(model, NoPropDT):
            raise TypeError(f"NoPropTrainer needs a {self.required_model}, got {type(model)}")
        for t in range(1, model.num_blocks + 1):
            yield self.block_loss(model, t, x, y)
        yield self.output_loss(model, y)

    def objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Backpropagates every loss as soon as it exists; returns their sum, detached."""
        total = torch.zeros((), device=x.device)
        for loss in self.losses(model, x, y):
            if loss.requires_grad:
                loss.backward()
            total += loss.detach()
        return total
