"""The `flwr` CLI driven from fedsim: Flower's executables and their environment, the
SuperLink connection in `FLWR_HOME/config.toml`, and run submission with `flwr run`.

`flwr` and the Flower executables run as subprocesses of this interpreter's
environment; the app bundle `flwr run` ships is the checkout at `APP_DIR`, submitted
from a copy of its shippable files (`staged_app`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import tomli_w

from fedsim.deployment.errors import DeploymentError, SuperLinkLostError

if TYPE_CHECKING:
    from pathspec import PathSpec

APP_DIR = Path(__file__).resolve().parents[2]  # pyproject.toml with [tool.flwr.app]
CONNECTION = "fedsim"  # the SuperLink connection fedsim writes into its FLWR_HOME
#: what `flwr` prints when it cannot reach the SuperLink (or loses it mid-stream)
UNREACHABLE = "Connection to the SuperLink is unavailable"
STOP_TIMEOUT_S = 30.0  # `flwr stop` after a failed run: never wait long on a lost SuperLink


def write_connection(flwr_home: Path, address: str, root_certificates: Path | None,
                     insecure: bool) -> None:
    """`FLWR_HOME/config.toml` naming one SuperLink connection (the default) for `flwr`."""
    connection: dict[str, object] = {"address": address}
    if insecure:
        connection["insecure"] = True
    elif root_certificates is not None:
        connection["root-certificates"] = str(Path(root_certificates).resolve())
    flwr_home.mkdir(parents=True, exist_ok=True)
    config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))


def connection_address(flwr_home: Path) -> str:
    """The address of the SuperLink connection `write_connection` wrote (for messages)."""
    try:
        config = tomllib.loads((flwr_home / "config.toml").read_text())
        return str(config["superlink"][CONNECTION]["address"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "?"


def _executable(name: str) -> str:
    """A Flower executable from this interpreter's environment (then from PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise DeploymentError(f"'{name}' not found: install flwr (pip install 'flwr==1.36.*')")
    return found


def flower_environment(flwr_home: Path) -> dict[str, str]:
    """The environment for Flower's processes: this `FLWR_HOME`, and this interpreter's
    scripts first on PATH (the SuperLink and SuperNodes spawn `flower-superexec`,
    `flwr-serverapp` and `flwr-clientapp` by name)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "FLWR_HOME": str(flwr_home), "PATH": path, "NO_COLOR": "1",
            "TERM": "dumb"}


def flwr_cli(args: Sequence[str], flwr_home: Path, timeout: float = 120.0,
             log_file: Path | None = None) -> str:
    """Run `flwr <args>` against `flwr_home`; return its stdout or raise naming the step."""
    try:
        done = subprocess.run([_executable("flwr"), *args], env=flower_environment(flwr_home),
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise DeploymentError(f"`flwr {args[0]}` did not finish within {timeout:.0f} s") from err
    output = done.stdout + done.stderr
    if log_file is not None:
        with log_file.open("a") as log:
            log.write(f"$ flwr {' '.join(args)}\n{output}\n")
    if done.returncode != 0:
        raise DeploymentError(f"`flwr {' '.join(args)}` failed (exit {done.returncode}): "
                              f"{_tail(output)}")
    return done.stdout


def flwr_json(args: Sequence[str], flwr_home: Path, log_file: Path | None = None) -> dict:
    """`flwr <args> --format json`: its JSON answer, or the error Flower reports in it.

    With `--format json`, `flwr` exits 0 on failure too and says so in the JSON.
    """
    output = flwr_cli([*args, "--format", "json"], flwr_home, log_file=log_file)
    try:
        answer = json.loads(output[output.index("{"):])
    except ValueError as err:  # no "{" at all, or not JSON after it
        raise DeploymentError(f"`flwr {args[0]}` printed no JSON: {_tail(output)}") from err
    if not answer.get("success", False):
        raise DeploymentError(f"`flwr {' '.join(args)}` failed: "
                              f"{answer.get('error-message', _tail(output))}")
    return answer


_BOX = re.compile(r"[\u2500-\u257f]+")  # the box drawing of Flower's error panels


def _tail(text: str, lines: int = 8) -> str:
    """The last lines of a process's output, on one line (for error messages), without
    the frames Flower draws around its errors."""
    kept = [" ".join(_BOX.sub(" ", line).split()) for line in text.strip().splitlines()]
    return " | ".join([line for line in kept if line][-lines:])


@dataclass(frozen=True)
class RunResult:
    """What the SuperLink says of a finished run."""

    run_id: int
    status: str  # e.g. "finished:completed", "finished:failed"


def submit_run(run_config: Mapping[str, str], flwr_home: Path, work_dir: Path, timeout: float,
               app_dir: Path = APP_DIR) -> RunResult:
    """Submit the fedsim app with `run_config` to the default connection; wait until it ends.

    The ServerApp's log streams into `work_dir/run.log`. A run still going after
    `timeout` seconds is stopped on the SuperLink before the error is raised.
    """
    if not (app_dir / "pyproject.toml").is_file():
        raise DeploymentError(f"{app_dir} has no pyproject.toml: deploy from a fedsim checkout "
                              "(pip install -e .)")
    work_dir.mkdir(parents=True, exist_ok=True)
    overrides = work_dir / "run_config.toml"
    overrides.write_text(tomli_w.dumps(dict(run_config)))
    log_file = work_dir / "run.log"
    with tempfile.TemporaryDirectory(prefix="fedsim-app-") as staging:
        app = staged_app(app_dir, Path(staging))
        with log_file.open("a") as log:
            log.write(f"# the app: the shippable files of {app_dir}, copied to {app}\n")
        started = flwr_json(["run", str(app), CONNECTION, "--run-config", str(overrides)],
                            flwr_home, log_file=log_file)
    run_id = int(started["run-id"])
    try:
        follow_log(run_id, flwr_home, log_file, timeout)
        status = run_status(run_id, flwr_home)
    except DeploymentError:
        with contextlib.suppress(DeploymentError):
            flwr_cli(["stop", str(run_id), CONNECTION], flwr_home, timeout=STOP_TIMEOUT_S,
                     log_file=log_file)
        raise
    return RunResult(run_id, status)


def staged_app(app_dir: Path, dest: Path) -> Path:
    """`dest` (an empty folder), holding a copy of the files of `app_dir` that a Flower app
    bundle may ship.

    `flwr run <folder>` lists every file below the folder before it filters them; in a
    checkout with its `.venv` (about 50,000 files) that took 7 s of each deployed run. This
    walk skips the folders none of whose files can ship, and copies the files that pass
    Flower's publish filters and the `.gitignore`, file by file as Flower checks them.
    Flower applies all of its rules again to the copy, so the bundle is the same, byte for
    byte (tests/test_deployment.py)."""
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns
    from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS, APP_PUBLISH_INCLUDE_PATTERNS

    patterns = load_gitignore_patterns(app_dir / ".gitignore")
    ignored, excluded = build_pathspec(patterns), build_pathspec(APP_PUBLISH_EXCLUDE_PATTERNS)
    shippable = build_pathspec(APP_PUBLISH_INCLUDE_PATTERNS)
    # an ignored folder may hold a file that a later `!` line brings back: then walk it
    pruned = [excluded] if any(p.startswith("!") for p in patterns) else [excluded, ignored]
    for folder, subfolders, files in os.walk(app_dir):
        here = Path(folder).relative_to(app_dir)
        subfolders[:] = [name for name in subfolders
                         if not _matches_folder(pruned, here / name)
                         and (Path(folder) / name).resolve() != dest.resolve()]
        for name in files:
            source, relative = Path(folder) / name, (here / name).as_posix()
            if source.is_symlink():  # Flower skips links too
                continue
            if shippable.match_file(relative) and not (excluded.match_file(relative)
                                                        or ignored.match_file(relative)):
                (dest / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, dest / relative)
    return dest


def _matches_folder(specs: Sequence[PathSpec], folder: Path) -> bool:
    return any(spec.match_file(f"{folder.as_posix()}/") for spec in specs)


def follow_log(run_id: int, flwr_home: Path, log_file: Path, timeout: float) -> None:
    """Append the ServerApp's log to `log_file` as it comes (`flwr log --stream`) until the
    run ends.

    Raises `SuperLinkLostError` when the SuperLink goes away meanwhile, and a
    `DeploymentError` after `timeout` seconds (the `flwr` process is stopped by pid first).
    """
    args = ["log", str(run_id), CONNECTION, "--stream"]
    with log_file.open("ab") as log:
        log.write(f"$ flwr {' '.join(args)}\n".encode())
        log.flush()
        start = log.tell()
        process = subprocess.Popen([_executable("flwr"), *args], stdout=log,
                                   stderr=subprocess.STDOUT, env=flower_environment(flwr_home))
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"run {run_id} did not finish within {timeout:.0f} s "
                                  "(backend.timeout_s); it was stopped") from None
        finally:
            if process.poll() is None:  # timeout, Ctrl-C, SIGTERM
                process.kill()
                process.wait()
    if code != 0:
        with log_file.open("rb") as log:
            log.seek(start)
            output = log.read().decode(errors="replace")
        if UNREACHABLE in output:
            raise SuperLinkLostError(f"{lost_message(run_id, flwr_home)} (the ServerApp's log "
                                     f"up to then is in {log_file})")
        raise DeploymentError(f"`flwr {' '.join(args)}` failed (exit {code}): {_tail(output)}")


def lost_message(run_id: int, flwr_home: Path) -> str:
    """Why a run cannot go on when its SuperLink went away."""
    return (f"lost the SuperLink at {connection_address(flwr_home)} during run {run_id}: it "
            "stopped or restarted, and the run cannot go on there")


def run_status(run_id: int, flwr_home: Path) -> str:
    """The SuperLink's status string for `run_id`."""
    try:
        runs = flwr_json(["ls", CONNECTION, "--run-id", str(run_id)], flwr_home).get("runs", [])
    except DeploymentError as err:
        if UNREACHABLE in str(err) or "not found" in str(err).lower():
            raise SuperLinkLostError(lost_message(run_id, flwr_home)) from None
        raise
    if not runs:
        raise SuperLinkLostError(f"the SuperLink at {connection_address(flwr_home)} no longer "
                                 f"lists run {run_id}: it restarted without the run's state")
    return str(runs[0].get("status"))
