"""The `flwr` CLI driven from fedsim: Flower's executables and their environment, the
SuperLink connection in `FLWR_HOME/config.toml`, and run submission with `flwr run`.

`flwr` and the Flower executables run as subprocesses of this interpreter's
environment; the app bundle `flwr run` ships is the checkout at `APP_DIR`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedsim.deployment.errors import DeploymentError

APP_DIR = Path(__file__).resolve().parents[2]  # pyproject.toml with [tool.flwr.app]
CONNECTION = "fedsim"  # the SuperLink connection fedsim writes into its FLWR_HOME


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


def _tail(text: str, lines: int = 8) -> str:
    """The last lines of a process's output, on one line (for error messages)."""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


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
    started = flwr_json(["run", str(app_dir), CONNECTION, "--run-config", str(overrides)],
                        flwr_home, log_file=log_file)
    run_id = int(started["run-id"])
    try:
        flwr_cli(["log", str(run_id), CONNECTION, "--stream"], flwr_home, timeout=timeout,
                 log_file=log_file)
    except DeploymentError:
        with contextlib.suppress(DeploymentError):
            flwr_cli(["stop", str(run_id), CONNECTION], flwr_home, log_file=log_file)
        raise
    return RunResult(run_id, run_status(run_id, flwr_home))


def run_status(run_id: int, flwr_home: Path) -> str:
    """The SuperLink's status string for `run_id`."""
    runs = flwr_json(["ls", CONNECTION, "--run-id", str(run_id)], flwr_home).get("runs", [])
    if not runs:
        raise DeploymentError(f"the SuperLink does not list run {run_id}")
    return str(runs[0].get("status"))
