"""Checkpoints of a run's state, and resuming a run from one.

Every `checkpoint.every` rounds the server writes `checkpoint.pkl` into the run
directory: the global arrays, the strategy's state (every plain-data attribute
of the strategy object: aggregation histories, server optimizer moments, virtual
clocks, clients in flight, stored model versions...), each
simulated node's persistent state, the random generators of the server
process, and the recorder's counters. It is written to a temporary file and
renamed over the last one, so a run killed at any moment leaves a whole
checkpoint behind.

`fedsim resume=<run dir>` rebuilds the run from its stored `config.yaml`,
restores that state, and runs the remaining rounds. Flower's round loop
(`Strategy.start`, run on `fedsim.engine_strategy.EngineStrategy`) runs them,
its round numbers shifted by the rounds already done, so the strategy and the
clients see the same round numbers, and draw the same random numbers, as in an
uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf, open_dict

from fedsim.errors import ConfigError

CHECKPOINT_FILE = "checkpoint.pkl"
CONFIG_FILE = "config.yaml"
#: keys that may change when a run resumes (how it runs, not what it computes)
RESUMABLE_OVERRIDES = ("progress", "device", "torch_threads", "flwr_log_level", "backend",
                       "logger", "plots")
log = logging.getLogger("fedsim")


@dataclass
class Checkpoint:
    """Everything a run needs to go on after round `server_round`."""

    server_round: int
    arrays: ArrayRecord
    objects: dict[str, dict[str, Any]]  # name -> `fedsim.state.checkpoint_state` of it
    clients: dict[int, RecordDict]
    rng: dict[str, Any]
    counters: dict[str, Any] = field(default_factory=dict)
    code: str = ""


# ---- state in and out -----------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The server process's generators: Python's (Flower samples clients with it), numpy's
    and torch's."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    """Set the generators `rng_state` saved."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def client_states(grid: Grid) -> dict[int, RecordDict]:
    """Each simulated node's persistent state (none for a grid of real nodes)."""
    return {node: context.state for node, context in getattr(grid, "contexts", {}).items()}


def restore_clients(grid: Grid, states: dict[int, RecordDict]) -> None:
    """Give each simulated node back the state `client_states` saved."""
    for node, state in states.items():
        grid.context(node).state = state


def save(run_dir: Path, checkpoint: Checkpoint) -> None:
    """Write `checkpoint.pkl` atomically: a whole new one or the old one, never a part."""
    path = Path(run_dir) / CHECKPOINT_FILE
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        pickle.dump(checkpoint, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def load(run_dir: Path) -> Checkpoint:
    """The run's checkpoint, or a `ConfigError` saying why there is none to resume from."""
    path = Path(run_dir) / CHECKPOINT_FILE
    try:
        with open(path, "rb") as source:
            checkpoint = pickle.load(source)  # noqa: S301 - the user's own run directory
    except FileNotFoundError:
        raise ConfigError(
            f"resume: '{run_dir}' has no {CHECKPOINT_FILE} (a run writes one every "
            "checkpoint.every rounds; this one stopped before its first)"
        ) from None
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as err:
        raise ConfigError(f"resume: '{path}' cannot be read ({err!r})") from None
    if not isinstance(checkpoint, Checkpoint):
        raise ConfigError(f"resume: '{path}' is not a fedsim checkpoint")
    return checkpoint


# ---- resuming -----------------------------------------------------------------------


def resumable_run_dir(run_dir: str) -> Path:
    """`run_dir` if a run can go on there: unfinished, with a checkpoint."""
    from fedsim.recording import SUMMARY_FILE

    path = Path(run_dir)
    if (path / SUMMARY_FILE).exists():
        raise ConfigError(f"resume: the run in '{path}' is finished ({SUMMARY_FILE} exists); "
                          "fedsim never overwrites a finished run's outputs")
    if not (path / CHECKPOINT_FILE).is_file():
        raise ConfigError(
            f"resume: '{path}' has no {CHECKPOINT_FILE} (a run writes one every "
            "checkpoint.every rounds; this one stopped before its first, or is not a run)"
        )
    return path


def _top_key(override: str) -> str:
    """`backend` for `backend.num_actors=2`, `+logger=wandb`, `~progress`..."""
    return override.lstrip("+~").split("=")[0].split(".")[0]


def stored_config(run_dir: str) -> DictConfig:
    """The resolved config a run saved in its directory."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"resume must be a fedsim run directory (no {path})")
    return OmegaConf.load(path)


def resumed_config(
    run_dir: str, overrides: Sequence[str] = (), composed: DictConfig | None = None
) -> DictConfig:
    """The stored config of the run in `run_dir`, set to resume there.

    Only how the run executes may change (`RESUMABLE_OVERRIDES`); anything else
    would make it another experiment, and is refused. `composed`: the config
    Hydra already composed with `overrides` (the CLI's), else they are composed here.
    """
    from fedsim.config import compose

    cfg = stored_config(run_dir)
    changed = [o for o in overrides if _top_key(o) != "resume"]
    refused = [o for o in changed if _top_key(o) not in RESUMABLE_OVERRIDES]
    if refused:
        raise ConfigError(
            f"resume continues a run with its stored config; only {', '.join(RESUMABLE_OVERRIDES)} "
            f"may be changed (got {refused})"
        )
    if changed and composed is None:
        composed = compose(changed)  # Hydra parses the values and groups
    with open_dict(cfg):
        for name in {_top_key(o) for o in changed}:
            cfg[name] = composed[name]
        cfg.resume = str(run_dir)
        cfg.output_dir = str(run_dir)
    return cfg


def check_same_experiment(cfg: DictConfig) -> None:
    """A config resuming a run must be that run's, but for `RESUMABLE_OVERRIDES`
    (`resumed_config` makes one; a hand-made one may differ)."""
    stored = OmegaConf.to_container(stored_config(cfg.resume), resolve=True)
    current = OmegaConf.to_container(cfg, resolve=True)
    ignored = {*RESUMABLE_OVERRIDES, "resume", "output_dir"}
    differ = sorted(key for key in set(stored) | set(current)
                    if key not in ignored and stored.get(key) != current.get(key))
    if differ:
        raise ConfigError(
            f"resume: {differ[0]} differs from the stored config of '{cfg.resume}' (and "
            f"{differ[1:] or 'nothing else'}); resume with `fedsim resume=<run dir>` or "
            "fedsim.checkpoint.resumed_config, which take the stored config"
        )
