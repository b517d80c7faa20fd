"""Flower's baseline strategies, with their settings checked when they are built.

Each class is Flower's own from `flwr.serverapp.strategy`, unchanged except that the
constructor checks the settings fedsim's configs expose, and that it loads its own
checkpointed state on resume (`fedsim.state.Checkpointed`). A bad value then stops the
run before any work, with one line naming the field, instead of surfacing as a
NaN or a failed round later. The robust rules also `check(spec)` that the cohort
can outvote the malicious clients they are told to expect.
"""

from __future__ import annotations

from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import Strategy

from fedsim.errors import is_int, is_number, require
from fedsim.spec import RunSpec
from fedsim.state import Checkpointed


def check_positive(strategy: Strategy, *names: str) -> None:
    for name in names:
        value = getattr(strategy, name)
        require(is_number(value) and value > 0, f"strategy.{name}", "a number > 0", value)


def check_below_one(strategy: Strategy, *names: str) -> None:
    for name in names:
        value = getattr(strategy, name)
        require(is_number(value) and 0 <= value < 1, f"strategy.{name}", "a number in [0, 1)",
                value)


class FedProx(Checkpointed, flwr_strategy.FedProx):
    """Flower's FedProx; `proximal_mu` >= 0."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        require(is_number(self.proximal_mu) and self.proximal_mu >= 0, "strategy.proximal_mu",
                "a number >= 0", self.proximal_mu)


class FedAdam(Checkpointed, flwr_strategy.FedAdam):
    """Flower's FedAdam; learning rates and tau > 0, betas in [0, 1)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        check_positive(self, "eta", "eta_l", "tau")
        check_below_one(self, "beta_1", "beta_2")


class FedYogi(Checkpointed, flwr_strategy.FedYogi):
    """Flower's FedYogi; learning rates and tau > 0, betas in [0, 1)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        check_positive(self, "eta", "eta_l", "tau")
        check_below_one(self, "beta_1", "beta_2")


class FedAdagrad(Checkpointed, flwr_strategy.FedAdagrad):
    """Flower's FedAdagrad; learning rates and tau > 0."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        check_positive(self, "eta", "eta_l", "tau")


class FedAvgM(Checkpointed, flwr_strategy.FedAvgM):
    """Flower's FedAvgM; server learning rate > 0, momentum in [0, 1)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        check_positive(self, "server_learning_rate")
        check_below_one(self, "server_momentum")


class FedTrimmedAvg(Checkpointed, flwr_strategy.FedTrimmedAvg):
    """Flower's FedTrimmedAvg; `beta` (the share trimmed at each end) in [0, 0.5)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        require(is_number(self.beta) and 0 <= self.beta < 0.5, "strategy.beta",
                "a number in [0, 0.5) (the share trimmed at each end)", self.beta)


def check_malicious_bound(spec: RunSpec, factor: int, rule: str) -> None:
    """The cohort outvotes `num_malicious_nodes`: clients_per_round >= factor * f + 3."""
    f, k = spec.cfg.strategy.get("num_malicious_nodes", 0), spec.cfg.clients_per_round
    require(k >= factor * f + 3, "clients_per_round",
            f">= {factor} * strategy.num_malicious_nodes + 3 = {factor * f + 3} for {rule}", k)


def check_malicious_count(strategy: Strategy) -> None:
    f = strategy.num_malicious_nodes
    require(is_int(f) and f >= 0, "strategy.num_malicious_nodes", "an integer >= 0", f)


class Krum(Checkpointed, flwr_strategy.Krum):
    """Flower's Krum; needs clients_per_round >= 2 f + 3."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        check_malicious_count(self)

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        check_malicious_bound(spec, 2, "Krum")


class MultiKrum(Checkpointed, flwr_strategy.MultiKrum):
    """Flower's MultiKrum; needs clients_per_round >= 2 f + 3 and selects at most a cohort."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        check_malicious_count(self)

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        check_malicious_bound(spec, 2, "Krum")
        k, n = spec.cfg.clients_per_round, spec.cfg.strategy.get("num_nodes_to_select", 1)
        require(is_int(n) and 1 <= n <= k, "strategy.num_nodes_to_select",
                f"an integer in [1, clients_per_round={k}]", n)


class Bulyan(Checkpointed, flwr_strategy.Bulyan):
    """Flower's Bulyan; needs clients_per_round >= 4 f + 3."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        check_malicious_count(self)

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        check_malicious_bound(spec, 4, "Bulyan")
