"""What a checkpoint keeps of a server-side object, and how the object takes it back.

A strategy (or the reply guard, or an attack) changes as rounds go by: aggregation
histories, server optimizer moments, virtual clocks. A checkpoint keeps the
object's plain-data attributes; on resume the object loads them itself, through
`load_checkpoint_state`, so no code outside its class assigns its attributes.
`Checkpointed` gives fedsim's classes both methods. A strategy from elsewhere
without them resumes only if nothing of it changed (Flower's FedAvg, FedMedian);
otherwise resume refuses it with one line, before any round runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.serverapp import Grid

from fedsim.codec import fingerprint
from fedsim.errors import ConfigError


def plain_state(obj: object, skip: Iterable[str] = ()) -> dict[str, Any]:
    """An object's plain-data attributes, less functions (metric aggregators given as
    arguments), grids and the names in `skip` (objects rebuilt from the config)."""
    skip = set(skip)
    return {
        name: value for name, value in vars(obj).items()
        if name not in skip and not callable(value) and not isinstance(value, Grid)
    }


class Checkpointed:
    """Mixin: the object's plain-data attributes are its checkpoint, and it loads them
    back itself. `not_checkpointed` names attributes rebuilt from the config instead."""

    not_checkpointed: tuple[str, ...] = ()

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of this object."""
        return plain_state(self, self.not_checkpointed)

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Take back what `checkpoint_state` gave (a resumed run, before its first round)."""
        vars(self).update(state)


class CheckpointedWrapper:
    """Mixin for a strategy that wraps another (`self.strategy`): its checkpoint is its own
    plain-data attributes plus the wrapped strategy's under `inner`, each loaded back by
    its owner."""

    strategy: object

    def checkpoint_state(self) -> dict[str, Any]:
        """The wrapper's own state, with the inner strategy's under `inner`."""
        return {**plain_state(self, ("strategy",)), "inner": checkpoint_state(self.strategy)}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Give the inner strategy its state, then take back the wrapper's own."""
        state = dict(state)
        load_checkpoint_state(self.strategy, state.pop("inner", {}), "strategy")
        vars(self).update(state)


def checkpoint_state(obj: object) -> dict[str, Any]:
    """`obj`'s own `checkpoint_state()`, or its plain-data attributes."""
    own = getattr(obj, "checkpoint_state", None)
    return own() if callable(own) else plain_state(obj)


def same_value(a: Any, b: Any) -> bool:
    """Whether two attribute values are stored alike by a checkpoint (`fedsim.codec`); a
    value a checkpoint cannot hold is never the same as one it holds."""
    try:
        return fingerprint(a) == fingerprint(b)
    except ConfigError:
        return False


def changed_attributes(obj: object, state: dict[str, Any]) -> list[str]:
    """The attributes of `obj` whose value differs from `state`'s (compared as stored)."""
    now = plain_state(obj)
    return sorted(name for name, value in state.items()
                  if name not in now or not same_value(now[name], value))


def load_checkpoint_state(obj: object, state: dict[str, Any], field: str) -> None:
    """Give `obj` back its checkpointed `state`, through its own `load_checkpoint_state`.

    An object without one (a strategy from elsewhere) resumes only if its state is what
    a fresh one has; otherwise `ConfigError` naming `field`.
    """
    load = getattr(obj, "load_checkpoint_state", None)
    if callable(load):
        load(state)
        return
    changed = changed_attributes(obj, state)
    if changed:
        raise ConfigError(
            f"{field} must define load_checkpoint_state(state) to resume (or subclass "
            f"fedsim.state.Checkpointed): {type(obj).__qualname__} changed {changed} during "
            "the run, and fedsim does not set another class's attributes")
