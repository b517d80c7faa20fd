"""Checkpoints of a run's state, and resuming a run from one.

Every `checkpoint.every` rounds the server writes `checkpoint.npz` into the run
directory: the experiment config it was made under, the global arrays, the
strategy's state (every plain-data attribute of the strategy object: aggregation
histories, server optimizer moments, virtual clocks, clients in flight, stored model
versions...), each simulated node's persistent state, the random generators of the server
process, and the recorder's counters. It is written to a temporary file and
renamed over the last one, so a run killed at any moment leaves a whole
checkpoint behind. The file is data only (`fedsim.codec`: tagged JSON plus arrays,
loaded without pickle), so resuming a run directory someone sent you runs no code
of theirs; an old `checkpoint.pkl` is refused, never opened.

`fedsim resume=<run dir>` rebuilds the run from its stored `config.yaml`,
checks that the checkpoint belongs to it (its config, its model's arrays), restores
that state, and runs the remaining rounds. Flower's round loop
(`Strategy.start`, run on `fedsim.engine_strategy.EngineStrategy`) runs them,
its round numbers shifted by the rounds already done, so the strategy and the
clients see the same round numbers, and draw the same random numbers, as in an
uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from fedsim import codec
from fedsim.errors import ConfigError
from fedsim.run_dir import CONFIG_FILE

CHECKPOINT_FILE = "checkpoint.npz"
#: older fedsim pickled its checkpoints: refused, never opened (loading one runs its code)
LEGACY_CHECKPOINT_FILE = "checkpoint.pkl"
#: keys that may change when a run resumes (how it runs, not what it computes)
RESUMABLE_OVERRIDES = ("progress", "device", "torch_threads", "flwr_log_level", "backend",
                       "logger", "plots")
#: keys a checkpoint's config is not compared on: the resumable ones, and where the run is
NOT_COMPARED = (*RESUMABLE_OVERRIDES, "resume", "output_dir")
#: how many differing keys or arrays a refusal names
SHOWN = 5
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
    #: the experiment config (`experiment_config`); `save` reads config.yaml when empty
    config: dict[str, Any] = field(default_factory=dict)


#: the type each of a loaded checkpoint's fields must have
FIELD_TYPES: dict[str, type] = {
    "server_round": int, "arrays": ArrayRecord, "objects": dict, "clients": dict, "rng": dict,
    "counters": dict, "code": str, "config": dict,
}


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
    """Write `checkpoint.npz` atomically: a whole new one or the old one, never a part.

    A failed write (a full disk) removes its temporary file and raises; the last
    checkpoint stays as it was.
    """
    path = Path(run_dir) / CHECKPOINT_FILE
    sections = {f.name: getattr(checkpoint, f.name) for f in fields(Checkpoint)}
    sections["config"] = checkpoint.config or run_config(run_dir)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as out:
            codec.dump(sections, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load(run_dir: Path) -> Checkpoint:
    """The run's checkpoint, checked against its config.yaml, or a `ConfigError` saying why
    there is none to resume from."""
    path = checkpoint_path(run_dir)
    checkpoint = read(path)
    check_config(path, checkpoint.config, run_config(run_dir))
    return checkpoint


def read(path: Path) -> Checkpoint:
    """The checkpoint in the file `path` (no check that it fits a run)."""
    sections = codec.load(path, tuple(FIELD_TYPES))
    wrong = section_problems(sections)
    if wrong:
        raise ConfigError(f"cannot load '{path}': {'; '.join(wrong)}")
    return Checkpoint(**sections)


def section_problems(sections: Mapping[str, Any]) -> list[str]:
    """What is wrong with a loaded checkpoint's sections: types, node states, generators."""
    wrong = [f"{name} is a {type(sections[name]).__name__}, not a {kind.__name__}"
             for name, kind in FIELD_TYPES.items() if not isinstance(sections[name], kind)]
    if wrong:
        return wrong
    if not all(type(node) is int and isinstance(state, RecordDict)
               for node, state in sections["clients"].items()):
        wrong.append("clients is not a map of node ids to RecordDicts")
    problem = rng_problem(sections["rng"])
    return wrong + ([f"rng: {problem}"] if problem else [])


def rng_problem(state: Mapping[str, Any]) -> str | None:
    """Why `restore_rng` would fail on `state` (tried on fresh generators), or None."""
    try:
        random.Random().setstate(state["python"])
        np.random.RandomState().set_state(state["numpy"])
        torch.Generator().set_state(state["torch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def checkpoint_path(run_dir: str | Path) -> Path:
    """The run's checkpoint file; `ConfigError` when it has none, or only a legacy pickle
    (which is never opened)."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if path.is_file():
        return path
    legacy = Path(run_dir) / LEGACY_CHECKPOINT_FILE
    if legacy.exists():
        raise ConfigError(
            f"resume: '{legacy}' is a pickle, an unsafe legacy checkpoint format that fedsim no "
            "longer opens (loading it would run any code put in it); restart the run, or "
            "resume it with the older fedsim that wrote it if you trust its source"
        )
    raise ConfigError(
        f"resume: '{run_dir}' has no {CHECKPOINT_FILE} (a run writes one every "
        "checkpoint.every rounds; this one stopped before its first, or is not a run)"
    )


# ---- does a checkpoint belong to the run? -----------------------------------------------


def experiment_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config as plain values, less what a resume may change (`NOT_COMPARED`)."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    return {key: value for key, value in plain.items() if key not in NOT_COMPARED}


def run_config(run_dir: str | Path) -> dict[str, Any]:
    """The experiment config stored in a run directory's config.yaml."""
    return experiment_config(stored_config(str(run_dir)))


def config_differences(stored: Any, current: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two plain configs (sorted)."""
    if not (isinstance(stored, dict) and isinstance(current, dict)):
        return [] if stored == current else [prefix]
    differ: list[str] = []
    for key in sorted(set(stored) | set(current), key=str):
        here = f"{prefix}.{key}" if prefix else str(key)
        if key not in stored or key not in current:
            differ.append(here)
        else:
            differ += config_differences(stored[key], current[key], here)
    return differ


def dotted(config: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted `key` of a plain config ("<none>" where it has none)."""
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return "<none>"
        value = value[part]
    return value


def check_config(path: Path, stored: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse a checkpoint made under another experiment config than the run's."""
    differ = sorted(config_differences(dict(stored), dict(current)),
                    key=lambda key: (key.count("."), key))  # top-level keys first
    if differ:
        first = differ[0]
        more = f" (and {', '.join(differ[1:SHOWN])}{', ...' if len(differ) > SHOWN else ''})" \
            if len(differ) > 1 else ""
        raise ConfigError(
            f"resume: '{path}' was made under another config than the run's {CONFIG_FILE}: "
            f"{first} is {dotted(stored, first)!r} in the checkpoint, "
            f"{dotted(current, first)!r} in the run{more}; a checkpoint resumes only the run "
            "that wrote it, with its config unchanged"
        )


def array_shapes(arrays: ArrayRecord) -> dict[str, tuple[int, ...]]:
    """Each array's name and shape."""
    return {name: tuple(array.shape) for name, array in arrays.items()}


def model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Each entry of the model's state dict: its name and shape."""
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def shape_differences(stored: Mapping[str, tuple[int, ...]],
                      expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """How stored arrays differ from the expected names and shapes, one phrase each."""
    missing = [f"no {name}" for name in expected if name not in stored]
    extra = [f"an unknown {name}" for name in stored if name not in expected]
    reshaped = [f"{name} of shape {stored[name]}, not {expected[name]}"
                for name in expected if name in stored and stored[name] != expected[name]]
    return missing + extra + reshaped


def check_arrays(path: Path, arrays: ArrayRecord, model: nn.Module) -> None:
    """Refuse a checkpoint whose global arrays do not fit the run's model."""
    differ = shape_differences(array_shapes(arrays), model_shapes(model))
    if differ:
        shown = ", ".join(differ[:SHOWN]) + (", ..." if len(differ) > SHOWN else "")
        raise ConfigError(
            f"resume: '{path}' does not fit this run's model ({type(model).__name__}): its "
            f"arrays have {shown}; a checkpoint resumes only the run that wrote it"
        )


def check_checkpoint(cfg: DictConfig, model: nn.Module | None = None) -> None:
    """Refuse, before anything is written, a checkpoint in `cfg.resume` that was made under
    another config than `cfg`'s, or (given the run's `model`) whose arrays do not fit it."""
    path = checkpoint_path(cfg.resume)
    wanted = ("config",) if model is None else ("config", "arrays")
    stored = codec.load(path, wanted)
    if not isinstance(stored["config"], dict):
        raise ConfigError(f"cannot load '{path}': its config is not a mapping")
    check_config(path, stored["config"], experiment_config(cfg))
    if model is not None:
        if not isinstance(stored["arrays"], ArrayRecord):
            raise ConfigError(f"cannot load '{path}': its arrays are not an ArrayRecord")
        check_arrays(path, stored["arrays"], model)


# ---- resuming -----------------------------------------------------------------------


def resumable_run_dir(run_dir: str) -> Path:
    """`run_dir` if a run can go on there: unfinished, with a checkpoint."""
    from fedsim.recording import SUMMARY_FILE

    path = Path(run_dir)
    if (path / SUMMARY_FILE).exists():
        raise ConfigError(f"resume: the run in '{path}' is finished ({SUMMARY_FILE} exists); "
                          "fedsim never overwrites a finished run's outputs")
    checkpoint_path(path)  # one to resume from, not a legacy pickle
    return path


def _key(override: str) -> str:
    """`backend.num_actors` for `+backend.num_actors=2`, `logger` for `logger=wandb`..."""
    return override.lstrip("+~").split("=")[0]


def _top_key(override: str) -> str:
    """`backend` for `backend.num_actors=2`, `+logger=wandb`, `~progress`..."""
    return _key(override).split(".")[0]


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
    # `plots.enabled=false` sets that leaf and keeps the stored plots.metrics; a group
    # (`backend=ray`), a whole setting or a deletion (`~x.y`) takes the composed node
    leaves = [o for o in changed if "." in _key(o) and not o.startswith("~")]
    with open_dict(cfg):
        for name in {_top_key(o) for o in changed if o not in leaves}:
            cfg[name] = composed[name]
        for key in {_key(o) for o in leaves}:
            OmegaConf.update(cfg, key, OmegaConf.select(composed, key), merge=False)
        cfg.resume = str(run_dir)
        cfg.output_dir = str(run_dir)
    return cfg


def check_same_experiment(cfg: DictConfig) -> None:
    """A config resuming a run must be that run's, but for `RESUMABLE_OVERRIDES`
    (`resumed_config` makes one; a hand-made one may differ). The checkpoint's own config
    and arrays are `check_checkpoint`'s."""
    stored, current = run_config(cfg.resume), experiment_config(cfg)
    differ = sorted(key for key in set(stored) | set(current)
                    if stored.get(key) != current.get(key))
    if differ:
        raise ConfigError(
            f"resume: {differ[0]} differs from the stored config of '{cfg.resume}' (and "
            f"{differ[1:] or 'nothing else'}); resume with `fedsim resume=<run dir>` or "
            "fedsim.checkpoint.resumed_config, which take the stored config"
        )
