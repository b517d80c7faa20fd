"""What a method's cross-group check reads, and the hook that declares such a check.

A method validates its own settings in its constructor. A need that spans groups (a
trainer that only works on one kind of network, a strategy that re-runs clients and so
cannot take batch normalization) is a `check(spec)` classmethod on the method's own
class. Preflight calls it for the classes of the groups in `CHECKED_GROUPS`, with the
run's composed config and the global model built for the run's data; a `ConfigError`
it raises becomes fedsim's one-line error. The engine itself names no method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from omegaconf import DictConfig

if TYPE_CHECKING:  # the command line imports this module; torch only when a run starts
    from torch import nn

#: the groups whose classes may declare `check(spec)`
CHECKED_GROUPS = ("client", "strategy", "attack", "devices", "backend", "logger", "privacy")


@dataclass(frozen=True)
class RunSpec:
    """The composed config and the global model (extended by the trainer) for the run's
    data, built once by preflight."""

    cfg: DictConfig
    model: nn.Module
    input_shape: tuple[int, ...]
    num_classes: int


@runtime_checkable
class ChecksRun(Protocol):
    """A class with needs across config groups. The default, for a class without the
    hook (Flower's own strategies among them), is no check."""

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        """Raise a `ConfigError` naming the field to change when `spec` does not fit."""


def client_uploads(cfg: DictConfig) -> str:
    """What the configured trainer uploads (`Trainer.uploads`; Flower-style weights if unset)."""
    from hydra.utils import get_class

    return getattr(get_class(cfg.client._target_), "uploads", "weights")


def check_run(classes: list[type], spec: RunSpec) -> None:
    """Run every declared `check(spec)` of `classes`, in order."""
    for cls in classes:
        if isinstance(cls, ChecksRun):
            cls.check(spec)
