"""What the engine may read from a strategy beyond Flower's `Strategy` API, in one place.

Any Flower strategy runs unchanged: every hook below is optional, and a strategy
that does not define it gets the default. A strategy provides a hook by defining
an attribute (or method) of the hook's name; `StrategyHooks` is the only code that
looks for them, so this table is the whole contract.

=================== ================================ ======================================
hook                default                          for a strategy that...
=================== ================================ ======================================
bind_run(cfg, data) nothing to do                    reads the run before round 1 (device
                                                     delays, a trainer it re-runs)
upload_problem      `reply_check.same_arrays_problem` takes uploads other than weights
weighted_by_key     `metrics.NUM_EXAMPLES`           weights replies by another metric
evaluation_arrays   the arrays as they are           evaluates a transformed global model
evaluation_variants none                             also scores other views of the model
                                                     (`server/<name>-accuracy`, ...)
slow_classes        none                             simulates slow holders of some classes
update_log          None (no updates.jsonl)          logs every update it applies
=================== ================================ ======================================

The values are read when asked for, not when `StrategyHooks` is made: `bind_run`
sets `slow_classes`, and a resumed run's restored state replaces `update_log`.

Two more are class attributes, read before any strategy exists (`expects_uploads`,
`applies_late_updates`, below). What a checkpoint keeps of a strategy, and how the
strategy takes it back, is `fedsim.state`'s (`checkpoint_state`, `load_checkpoint_state`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from fedsim.metrics import NUM_EXAMPLES
from fedsim.reply_check import UploadCheck, same_arrays_problem


class StrategyHooks:
    """The optional hooks of one strategy, each with its default (see the module's table)."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def _hook(self, name: str, default: Any) -> Any:
        return getattr(self.strategy, name, default)

    def bind_run(self, cfg: Any, data: Any) -> None:
        """Let the strategy read the run (config, federated data) before the first round."""
        bind = self._hook("bind_run", None)
        if bind is not None:
            bind(cfg, data)

    @property
    def upload_problem(self) -> UploadCheck:
        """What is wrong with a train upload, given the arrays sent (or None)."""
        return self._hook("upload_problem", same_arrays_problem)

    @property
    def weighted_by_key(self) -> str:
        """The reply metric the strategy weights by."""
        return self._hook("weighted_by_key", NUM_EXAMPLES)

    @property
    def evaluation_arrays(self) -> Callable[[ArrayRecord], ArrayRecord] | None:
        """The arrays the server evaluates in place of the global ones (None: the global)."""
        return self._hook("evaluation_arrays", None)

    @property
    def evaluation_variants(self) -> dict[str, Callable[[ArrayRecord], ArrayRecord]]:
        """Other views of the global arrays the server also evaluates, by metric prefix."""
        return dict(self._hook("evaluation_variants", {}))

    @property
    def slow_classes(self) -> list[int]:
        """Classes whose holders the strategy simulates as slow (reported per class)."""
        return list(self._hook("slow_classes", ()))

    @property
    def update_log(self) -> list[dict[str, Any]] | None:
        """The strategy's growing list of applied updates (written to updates.jsonl)."""
        return self._hook("update_log", None)


def expects_uploads(strategy_cls: type) -> str:
    """What the strategy aggregates: "weights" (Flower's strategies), "deltas" or
    "rankings"; config validation pairs it with the trainer's `uploads`."""
    return getattr(strategy_cls, "expects_uploads", "weights")


def applies_late_updates(strategy_cls: type) -> bool:
    """Whether the strategy applies late clients' updates (a delaying `devices` model
    needs one); Flower's own strategies wait for every reply."""
    return bool(getattr(strategy_cls, "applies_late_updates", False))


def strategy_hooks(strategy: Strategy) -> StrategyHooks:
    """`strategy`'s optional hooks, with their defaults."""
    return StrategyHooks(strategy)
