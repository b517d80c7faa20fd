"""The `privacy` config group: what each option wraps, trains with and refuses.

An option wraps the configured strategy (`wrap`), may give the trainer DP-SGD
settings (`dp_sgd`), and checks what it needs of the other groups (`check(spec)`,
preflight's hook). `privacy=none` changes nothing.
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    FedAvg,
    Strategy,
)
from hydra.utils import get_class

from fedsim.clients.base import UPLOADS_WEIGHTS
from fedsim.errors import ConfigError, is_number, require
from fedsim.spec import RunSpec, client_uploads

CLIP_SIDES = ("server", "client")
#: the train config entry naming the client-side clipping mod to run ("fixed" or "adaptive")
CLIP_MOD = "dp-clip-mod"


def check_delta(delta: float) -> None:
    """A delta in (0, 1); the usual choice is below 1 / (number of protected units)."""
    require(is_number(delta) and 0 < delta < 1, "privacy.delta",
            "a number in (0, 1), e.g. 1e-5", delta)


class NoPrivacy:
    """No differential privacy: the strategy and trainer as configured."""

    dp_sgd = None

    def inner_settings(self) -> dict[str, object]:
        """Settings the wrapped strategy must be built with (none)."""
        return {}

    def wrap(self, strategy: Strategy, *, num_sampled_clients: int, population: int,
             seed: int) -> Strategy:
        """The strategy the server runs: `strategy` itself."""
        return strategy


class CentralDP(NoPrivacy):
    """User-level DP for a weight-averaging strategy: Flower's clipping wrappers, with
    Gaussian noise of std `noise_multiplier * clipping_norm / cohort` on the average.

    Parameters
    ----------
    noise_multiplier : noise std over the clipping norm (of the sum of updates).
    clipping_norm : L2 bound on each client's update `w_i - w` (fixed clipping), or the
        starting bound (`adaptive`).
    clip_on : "server" (the server clips what it receives) or "client" (Flower's
        clipping mod clips before upload; the server never sees an unclipped update).
    adaptive : track the `target_quantile` of update norms (Andrew et al. 2021) with a
        noisy clipped count of std `clipped_count_stddev` (null: cohort / 20), stepping
        the norm geometrically at `clip_norm_lr`.
    delta : the delta at which `privacy/epsilon` is reported.
    """

    def __init__(self, noise_multiplier: float = 1.0, clipping_norm: float = 1.0,
                 clip_on: str = "server", adaptive: bool = False, target_quantile: float = 0.5,
                 clip_norm_lr: float = 0.2, clipped_count_stddev: float | None = None,
                 delta: float = 1e-5) -> None:
        require(is_number(noise_multiplier) and noise_multiplier > 0,
                "privacy.noise_multiplier", "a number > 0", noise_multiplier)
        require(is_number(clipping_norm) and clipping_norm > 0, "privacy.clipping_norm",
                "a number > 0", clipping_norm)
        require(clip_on in CLIP_SIDES, "privacy.clip_on", f"one of {list(CLIP_SIDES)}", clip_on)
        require(isinstance(adaptive, bool), "privacy.adaptive", "true or false", adaptive)
        require(is_number(target_quantile) and 0 <= target_quantile <= 1,
                "privacy.target_quantile", "a number in [0, 1]", target_quantile)
        require(is_number(clip_norm_lr) and clip_norm_lr > 0, "privacy.clip_norm_lr",
                "a number > 0", clip_norm_lr)
        require(clipped_count_stddev is None
                or (is_number(clipped_count_stddev) and clipped_count_stddev > 0),
                "privacy.clipped_count_stddev", "a number > 0, or null (cohort / 20)",
                clipped_count_stddev)
        check_delta(delta)
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.clip_on = clip_on
        self.adaptive = adaptive
        self.target_quantile = target_quantile
        self.clip_norm_lr = clip_norm_lr
        self.clipped_count_stddev = clipped_count_stddev
        self.delta = delta

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        """A strategy whose new model is FedAvg's mean (the one the noise covers), weight
        uploads, a model without buffers, and a client that moves the weights (lr > 0)."""
        cfg = spec.cfg
        strategy_cls = get_class(cfg.strategy._target_)
        require(issubclass(strategy_cls, FedAvg)
                and strategy_cls.aggregate_train is FedAvg.aggregate_train, "strategy",
                "fedavg or fedprox under central DP: the noise covers FedAvg's mean of "
                "clipped updates; a server optimizer (fedavgm, fedadam, ...) would keep and "
                "re-release un-noised state, a median or selection has another sensitivity; "
                "use privacy=local for other rules", str(cfg.strategy._target_))
        buffers = [name for name, _ in spec.model.named_buffers()]
        require(not buffers, "model",
                f"a model without buffers under central DP ({cfg.model._target_} keeps "
                f"{buffers[:2]}: noise on normalization statistics breaks them; use a "
                "model without batch norm, e.g. model=resnet18 model.norm=group)",
                str(cfg.model._target_))
        uploads = client_uploads(cfg)
        require(uploads == UPLOADS_WEIGHTS, "client",
                f"a trainer that uploads weights under central DP (client {cfg.client._target_}"
                f" uploads {uploads}; clipping bounds w_i - w)", str(cfg.client._target_))
        require(cfg.client.get("lr", 1.0) != 0, "client.lr",
                "> 0 under central DP (an update of exactly zero stops Flower's clipping with "
                "a division by zero)", cfg.client.get("lr"))
        require("weighted_by_key" not in cfg.strategy, "strategy.weighted_by_key",
                "unset under central DP (every client weighs the same, as the noise assumes)",
                cfg.strategy.get("weighted_by_key"))

    def inner_settings(self) -> dict[str, object]:
        """Every reply weighs the same: `DP_WEIGHT`, which the wrapper sets to 1."""
        from fedsim.privacy.central import DP_WEIGHT

        return {"weighted_by_key": DP_WEIGHT}

    def wrap(self, strategy: Strategy, *, num_sampled_clients: int, population: int,
             seed: int) -> Strategy:
        """`strategy` in the Flower DP wrapper of this clipping, with accounting."""
        from fedsim.privacy import central

        accounting = {"population": population, "delta": self.delta, "seed": seed}
        if self.adaptive:
            cls = (central.ServerSideAdaptiveClipping if self.clip_on == "server"
                   else central.ClientSideAdaptiveClipping)
            stddev = self.clipped_count_stddev or num_sampled_clients / 20  # Flower's default
            require(self.noise_multiplier < 2 * stddev, "privacy.clipped_count_stddev",
                    f"> noise_multiplier / 2 = {self.noise_multiplier / 2} (null means "
                    f"clients_per_round / 20 = {num_sampled_clients / 20}); the clipped count's "
                    "noise takes that share of the budget, leaving the updates none",
                    self.clipped_count_stddev)
            return cls(strategy, self.noise_multiplier, num_sampled_clients, self.clipping_norm,
                       self.target_quantile, self.clip_norm_lr, self.clipped_count_stddev,
                       **accounting)
        cls = (central.ServerSideFixedClipping if self.clip_on == "server"
               else central.ClientSideFixedClipping)
        return cls(strategy, self.noise_multiplier, self.clipping_norm, num_sampled_clients,
                   **accounting)


class LocalDP(NoPrivacy):
    """Sample-level DP: every client trains with DP-SGD (Opacus), any strategy aggregates.

    Parameters
    ----------
    noise_multiplier : noise std over `max_grad_norm`, added to each step's summed gradient.
    max_grad_norm : L2 bound on each sample's gradient.
    delta : the delta at which each client's `privacy/epsilon` is reported.
    """

    def __init__(self, noise_multiplier: float = 1.0, max_grad_norm: float = 1.0,
                 delta: float = 1e-5) -> None:
        from fedsim.privacy.dp_sgd import DPSGD

        check_delta(delta)
        self.dp_sgd = DPSGD(noise_multiplier, max_grad_norm)
        self.delta = delta

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        """A trainer that runs DP-SGD, on a model Opacus can take per-sample gradients of."""
        from opacus.validators import ModuleValidator

        from fedsim.clients.sgd import SGDTrainer

        cfg = spec.cfg
        trainer_cls = get_class(cfg.client._target_)
        plain_sgd = issubclass(trainer_cls, SGDTrainer) and all(
            getattr(trainer_cls, name) is getattr(SGDTrainer, name)
            for name in ("train", "sgd_epochs", "objective", "batch_loss"))
        require(plain_sgd, "client",
                "a trainer of end-to-end SGD on cross-entropy under privacy=local (client=sgd; "
                f"{cfg.client._target_} changes the training loop or objective, which DP-SGD's "
                "per-sample clipping does not cover)", str(cfg.client._target_))
        require(float(cfg.client.get("proximal_mu", 0.0)) == 0, "client.proximal_mu",
                "0 under privacy=local (the proximal term's gradient is not per-sample)",
                cfg.client.get("proximal_mu"))
        require(float(cfg.strategy.get("proximal_mu", 0.0)) == 0, "strategy.proximal_mu",
                "0 under privacy=local (DP-SGD does not add the proximal term it sends)",
                cfg.strategy.get("proximal_mu"))
        require(not cfg.evaluation.get("finetune_epochs", 0), "evaluation.finetune_epochs",
                "0 under privacy=local (its fine-tune is plain SGD on the private samples, "
                "and its scores go to the server)", cfg.evaluation.get("finetune_epochs"))
        require(not cfg.client.get("cosine_epochs", False), "client.cosine_epochs",
                "false under privacy=local", cfg.client.get("cosine_epochs"))
        errors = ModuleValidator.validate(spec.model, strict=False)
        if errors:
            raise ConfigError(
                f"model ({cfg.model._target_}) cannot train under privacy=local: "
                f"{str(errors[0]).split('.')[0]}; pick a model without batch normalization "
                "(e.g. model=mlp, or a norm: group/layer)")

    def wrap(self, strategy: Strategy, *, num_sampled_clients: int, population: int,
             seed: int) -> Strategy:
        """`strategy` with each client's DP-SGD accounted (`LocalAccounting`)."""
        from fedsim.privacy.local import LocalAccounting

        return LocalAccounting(strategy, delta=self.delta)
