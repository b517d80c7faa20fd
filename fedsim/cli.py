"""`fedsim`: the Hydra command line.

    fedsim strategy=fedprox dataset=mnist1d partition=dirichlet partition.alpha=0.1
    fedsim -m partition=dirichlet partition.alpha=0.05,0.5,5 seed=0,1,2
    fedsim +experiment=<preset>
    fedsim resume=<run dir>          # go on from the run's last checkpoint

Only Hydra is imported up front, so `fedsim --help` and a mistyped key or option
answer without importing torch, Flower or Ray. Every mistake in the command line
or the config is one `fedsim: error: ...` line with exit 2; a run that never
started leaves no folder behind; Ctrl-C stops a run with one line that says how
to resume it.
"""

from __future__ import annotations

import difflib
import errno
import json
import logging
import os
import re
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from fedsim.config import CONF_DIR, compose
from fedsim.errors import ConfigError, DataError, FedsimError, RunFailedError

log = logging.getLogger("fedsim")
#: set once Hydra hands over a composed config: Hydra errors after that are the run's own
_STARTED: list[bool] = []
#: what Hydra writes into a run directory before fedsim does anything
_HYDRA_OUTPUT = ".hydra"


class Stopped(KeyboardInterrupt):
    """SIGTERM (`kill`), raised like Ctrl-C so that a run's workers stop the same way."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> float | None:
    _STARTED.append(True)
    signal.signal(signal.SIGTERM, _stop)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        from fedsim.experiment import run_experiment, shown_path  # torch, Flower: a real run

        if cfg.resume is not None:
            from fedsim.checkpoint import resumed_config

            cfg = resumed_config(cfg.resume, hydra_cfg.overrides.task, cfg)
        with open_dict(cfg):
            if cfg.output_dir is None:
                cfg.output_dir = str(run_dir)
        summary = run_experiment(cfg)
    except FedsimError as err:
        if isinstance(err, ConfigError | DataError):  # refused before any work
            discard_unused_outputs(run_dir, cfg.resume, hydra_cfg)
        hint = resume_hint(Path(cfg.output_dir or run_dir)) if isinstance(err, RunFailedError) \
            else ""
        print(f"fedsim: error: {err}{hint}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as err:
        if err.errno not in STORAGE_ERRNOS and err.filename is None:
            raise
        print(storage_failure(err, Path(cfg.output_dir or run_dir)), file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as stop:
        unused = cfg.resume is None and discard_unused_outputs(run_dir, None, hydra_cfg)
        print(interrupted_line(Path(cfg.output_dir or run_dir), cfg.num_rounds, not unused),
              file=sys.stderr)
        raise SystemExit(128 + getattr(stop, "signum", signal.SIGINT)) from None
    failures = {k: summary.get(k, 0) for k in ("train_failures", "skipped_rounds")}
    log.info(
        "run finished: final server accuracy %s, outputs in %s%s",
        summary["final_server_accuracy"], shown_path(Path(cfg.output_dir)),
        f" ({failures['train_failures']} failed train replies, {failures['skipped_rounds']} "
        "skipped rounds: see the warnings above)" if any(failures.values()) else "",
    )
    return summary["final_server_accuracy"]


def _stop(signum: int, frame: object) -> None:
    raise Stopped(signum)


def main() -> None:
    """Console-script entry point: Hydra's errors become one line and exit 2."""
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors here instead of exit 1
    args = sys.argv[1:]
    try:
        extra = resume_overrides(args)
        sys.argv[1:] = [*args, *extra, *claimed_run_dir([*args, *extra])]
        _main()
    except (HydraException, OmegaConfBaseException, FedsimError) as err:
        if _STARTED or wants_traceback:
            raise
        print(f"fedsim: error: {explain(err, args)}", file=sys.stderr)
        raise SystemExit(2) from None


# ---- resume: the run's own folder -------------------------------------------------------


def resume_arg(args: Sequence[str]) -> str | None:
    """The run directory a `resume=<dir>` argument names (None without one, or null)."""
    resume = next((a.split("=", 1)[1] for a in args if a.startswith("resume=")), None)
    return None if resume in (None, "", "null") else resume


def resume_overrides(args: Sequence[str]) -> list[str]:
    """Hydra overrides that put a resumed run's Hydra files into the run's own directory
    (`.hydra.resumed<n>`, its log appended), instead of a new empty `outputs/` folder."""
    resume = resume_arg(args)
    if resume is None or "-m" in args or "--multirun" in args:
        return []
    run_dir = Path(resume)
    if not run_dir.is_dir():
        raise FedsimError(f"resume: '{resume}' is not a directory (a fedsim run directory, "
                          "e.g. outputs/<date>/<time>)")
    subdir = next(name for n in range(1, 10_000)
                  if not (run_dir / (name := f"{_HYDRA_OUTPUT}.resumed{n}")).exists())
    return [f"hydra.run.dir={_quoted(run_dir.resolve())}", f"hydra.output_subdir={subdir}"]


# ---- one run per directory, claimed before Hydra writes into it -------------------------


def claimed_run_dir(args: Sequence[str]) -> list[str]:
    """Claim the run directory Hydra is about to write into, and pin it (an override).

    Hydra writes `.hydra/` and its log before fedsim runs a line; a run refused there (the
    directory holds a finished run, or another run holds it now) must not have touched it.
    The directory is composed here, with Hydra's own config and the user's overrides, then
    claimed (`fedsim.run_dir.claim`); pinned, a `${now:...}` in it resolves only once. A
    sweep (`-m`) refuses a sweep folder that already holds one; each of its runs claims its
    own folder. A command line Hydra cannot read is left to Hydra's own message.
    """
    from fedsim.run_dir import claim

    hydra_cfg = _hydra_config([a for a in args if a not in ("-m", "--multirun")])
    if hydra_cfg is None:
        return []
    if "-m" in args or "--multirun" in args:
        sweep_dir = Path(hydra_cfg.sweep.dir)
        if (sweep_dir / "multirun.yaml").exists():
            raise ConfigError(f"hydra.sweep.dir '{sweep_dir}' already holds a sweep; choose a "
                              "new hydra.sweep.dir (fedsim never overwrites a run's outputs)")
        return [f"hydra.sweep.dir={_quoted(sweep_dir.resolve())}"]
    run_dir = Path(hydra_cfg.run.dir)
    fresh = resume_arg(args) is None
    claim(run_dir, fresh=fresh, field="hydra.run.dir" if fresh else "resume")
    return [f"hydra.run.dir={_quoted(run_dir.resolve())}"]


def _hydra_config(args: Sequence[str]) -> DictConfig | None:
    """Hydra's own config (`hydra.run`, `hydra.sweep`) as the command line sets it, or None
    when Hydra cannot compose it (Hydra's run then reports why)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = [a for a in args if not a.startswith("-")]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
        return OmegaConf.create({"run": {"dir": str(cfg.hydra.run.dir)},
                                 "sweep": {"dir": str(cfg.hydra.sweep.dir)}})
    except (HydraException, OmegaConfBaseException, ValueError):
        return None


def _quoted(path: Path) -> str:
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


# ---- a run that never started leaves nothing --------------------------------------------


def discard_unused_outputs(run_dir: Path, resume: str | None, hydra_cfg: DictConfig) -> bool:
    """Remove what Hydra wrote for a run refused (or stopped) before it wrote anything.

    A new run directory holding only Hydra's `.hydra/` and log goes, with its sweep or date
    folder once that is empty too; a resumed run keeps its directory and loses only this
    attempt's Hydra subfolder. True if something was removed.
    """
    if resume is not None:
        subdir = hydra_cfg.output_subdir
        if subdir and subdir != _HYDRA_OUTPUT and (run_dir / subdir).is_dir():
            shutil.rmtree(run_dir / subdir)
            return True
        return False
    from fedsim.run_dir import CLAIM_FILE, release

    hydra_files = {_HYDRA_OUTPUT, f"{hydra_cfg.job.name}.log", CLAIM_FILE}
    if not run_dir.is_dir() or not set(os.listdir(run_dir)) <= hydra_files:
        return False
    release(run_dir)
    shutil.rmtree(run_dir)
    _remove_empty_parents(run_dir.parent)
    return True


def _remove_empty_parents(folder: Path) -> None:
    """The date folder (or a sweep folder with nothing but multirun.yaml), then `outputs/`,
    while they are empty, never above the working directory."""
    cwd = Path.cwd().resolve()
    folder = folder.resolve()
    while folder != cwd and cwd in folder.parents:
        left = set(os.listdir(folder))
        if left == {"multirun.yaml"}:
            (folder / "multirun.yaml").unlink()
        elif left:
            return
        folder.rmdir()
        folder = folder.parent


# ---- the disk ---------------------------------------------------------------------------

#: a file the run writes could not be written: full disk, quota, read-only, no permission
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                  errno.ENOTDIR, errno.EISDIR, errno.EFBIG)


def storage_failure(err: OSError, run_dir: Path) -> str:
    """One line for a write that failed mid-run: the file, the reason, and how to go on
    (the last checkpoint is whole: it is replaced only by a complete new one)."""
    where = err.filename or f"into the run directory {run_dir}"
    return (f"fedsim: error: cannot write {where}: {err.strerror or err}"
            f"{resume_hint(run_dir)}")


# ---- Ctrl-C -----------------------------------------------------------------------------


def interrupted_line(run_dir: Path, num_rounds: int, started: bool = True) -> str:
    """One line for an interrupted run: the round reached, its last checkpoint, and the
    command that resumes it."""
    if not started:
        return "fedsim: interrupted before the first round; nothing was written"
    from fedsim.experiment import shown_path

    done = _last_round(run_dir)
    where = shown_path(run_dir)
    head = f"fedsim: interrupted after round {done} of {num_rounds}"
    checkpoint = _checkpoint_round(run_dir)
    if checkpoint is None:
        return (f"{head}; no checkpoint yet (one is written every checkpoint.every rounds), so "
                f"a rerun starts over; outputs in {where}")
    from fedsim.checkpoint import CHECKPOINT_FILE

    return (f"{head}; last checkpoint: round {checkpoint} ({where}/{CHECKPOINT_FILE}); "
            f"go on with: fedsim resume={where}")


def resume_hint(run_dir: Path) -> str:
    """How a failed run goes on: from its checkpoint if it has one, else from the start."""
    from fedsim.experiment import shown_path

    checkpoint = _checkpoint_round(run_dir)
    if checkpoint is None:
        return ("; the run had no checkpoint yet (one is written every checkpoint.every "
                "rounds), so once that is fixed a rerun starts over")
    return (f"; once that is fixed, go on from round {checkpoint} with: fedsim "
            f"resume={shown_path(run_dir)}")


def _last_round(run_dir: Path) -> int:
    from fedsim.recording import METRICS_FILE

    try:
        lines = (run_dir / METRICS_FILE).read_text().splitlines()
        return int(json.loads(lines[-1])["round"]) if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def _checkpoint_round(run_dir: Path) -> int | None:
    from fedsim.checkpoint import CHECKPOINT_FILE, load

    if not (run_dir / CHECKPOINT_FILE).is_file():
        return None
    try:
        return load(run_dir).server_round
    except FedsimError:
        return None


# ---- Hydra's errors as one line ---------------------------------------------------------


def explain(err: Exception, args: Sequence[str]) -> str:
    """One line for a command-line mistake, with a "did you mean" from the known keys and
    options."""
    if isinstance(err, FedsimError):
        return str(err)
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, option = str(err.missing_cfg_file).rpartition("/")
        options = list(err.options or [])
        return (f"{group}={option}: no such {group} option{_did_you_mean(option, options)} "
                f"(options: {', '.join(options)})")
    if isinstance(err, OverrideParseException):
        return f"cannot read the override '{err.override}': {str(err).splitlines()[0]}"
    key = _failed_key(err)
    if key is not None:
        return f"unknown key {key}{_key_hint(key, [a for a in args if _key_of(a) != key])}"
    return str(err).splitlines()[0]


def _key_hint(key: str, other_args: Sequence[str]) -> str:
    """": did you mean <key>?" from the keys beside `key`; for a top-level key also from every
    dotted key with a like last part (`alpha` -> `partition.alpha`); else the keys there."""
    siblings, everything = _known_keys(key, other_args)
    parent, _, name = key.rpartition(".")
    close = [f"{parent}.{k}".lstrip(".") for k in difflib.get_close_matches(name, siblings, n=1)]
    if not close and not parent:
        by_last = {k.rpartition(".")[2]: k for k in reversed(everything) if "." in k}
        close = [by_last[k] for k in difflib.get_close_matches(name, list(by_last), n=1)]
    if close:
        return f": did you mean {close[0]}?"
    return f" (the settings of {parent or 'the run'}: {', '.join(siblings)})" if siblings else ""


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f": did you mean {close[0]}?" if close else ""


def _failed_key(err: Exception) -> str | None:
    """The config key an override could not set or delete."""
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return str(cause.full_key)
    match = re.search(r"'([^']+)' does not exist", str(err))
    return match.group(1) if match else None


def _key_of(arg: str) -> str:
    return arg.lstrip("+~").split("=", 1)[0]


def _known_keys(key: str, other_args: Sequence[str]) -> tuple[list[str], list[str]]:
    """The keys beside `key` and every dotted key, in the config the other overrides make."""
    overrides = [a for a in other_args if not a.startswith("-") and "," not in a]
    try:
        cfg = compose(overrides)
    except (HydraException, OmegaConfBaseException):
        cfg = compose()
    parent = key.rpartition(".")[0]
    node = OmegaConf.select(cfg, parent) if parent else cfg
    siblings = [str(k) for k in node if k not in ("hydra", "defaults") and not str(
        k).startswith("_")] if isinstance(node, DictConfig) else []
    return siblings + _unset_settings(node, siblings), _dotted(cfg)


def _unset_settings(node: object, present: Sequence[str]) -> list[str]:
    """A group's constructor settings its yaml leaves out, as `+group.key=...` (a key that
    is not in the yaml yet is added with `+`)."""
    from fedsim.config import GROUPS, settings_of

    if not isinstance(node, DictConfig) or node._key() not in GROUPS or "_target_" not in node:
        return []
    names = settings_of(node._key(), str(node._target_))
    return [f"+{node._key()}.{n}" for n in names if n not in present]


def _dotted(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k in node:
        if prefix == "" and k == "hydra":
            continue
        child = node._get_node(k)
        name = f"{prefix}{k}"
        keys.append(name)
        if isinstance(child, DictConfig):
            keys.extend(_dotted(child, f"{name}."))
    return keys
