"""Deployment under faults, on loopback: the numbers of docs/deployment.md, "Faults on a
real federation".

Each scenario starts a local federation (`fedsim.deployment.federation.LocalFederation`),
submits a run to it with the `fedsim` command (`backend.superlink=<its Control API>`),
injects its faults, and stops every process it started by pid, also when it fails:

- `faults`: 3 SuperNodes, 4 rounds. SuperNode 0 (with everything below it) is killed
  with SIGKILL while it trains in round 1, and restarted once the server logged its
  failure: the round completes with the other nodes, the restarted node trains again.
  Then the SuperLink is killed with SIGKILL after the checkpoint of round 2 and
  restarted on the same ports and state file: the run fails with one line, and
  `fedsim resume=<run dir>` is tried on the same federation.
- `quick`, `quick-deadline`: SuperNode 0 killed in round 1 and restarted at once, as a
  supervisor would, without a round deadline and with `faults.timeout_s=90`.
- `scale`: `--nodes` SuperNodes (default 20) training and evaluating for `--rounds`
  rounds (default 3): the time of each round and the peak of the summed RSS of every
  process involved.

    python scripts/deployment_faults.py                      # all of them, about 40 min
    python scripts/deployment_faults.py --only scale --nodes 8 --rounds 1

`tests/test_deployment_faults.py` runs `faults` at CI size (2 SuperNodes, 3 rounds). The
model and data are the tests' tiny ones (MNIST-1D, an MLP, one local epoch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from fedsim.deployment.federation import RESTARTED_MARK, LocalFederation

ROOT = Path(__file__).resolve().parents[1]
#: the tests' tiny run (tests/conftest.py), sized for a few SuperNodes on 2 CPU cores
SMALL = ["logger=none", "progress=false", "model=mlp", "client.local_epochs=1",
         "client.momentum=0.0", "data.client_test_ratio=0.25", "checkpoint.every=0"]
STEP_TIMEOUT_S = 240.0  # longest wait for any one step of a scenario
RUN_TIMEOUT_S = 480.0   # longest a whole submitted run may take (backend.timeout_s)
QUICK_DEADLINE_S = 90.0  # faults.timeout_s of `quick-deadline`: well above a round here


# ---- the fedsim command, and what it leaves in its run directory ------------------------


def fedsim_command(*overrides: str) -> list[str]:
    """The `fedsim` console script of this interpreter's environment, with `overrides`."""
    script = Path(sys.executable).parent / "fedsim"
    if script.exists():
        return [str(script), *overrides]
    return [sys.executable, "-c", "from fedsim.cli import main; main()", *overrides]


def backend_overrides(federation: LocalFederation, timeout_s: float = RUN_TIMEOUT_S) -> list[str]:
    """`backend=deployment` submitting to `federation`'s SuperLink (with its CA, or without
    TLS, as the federation runs)."""
    security = [f"backend.root_certificates={federation.tls_files.ca_cert}"] \
        if federation.tls else ["backend.insecure=true"]
    return ["backend=deployment", f"backend.superlink={federation.control_address}",
            *security, f"backend.timeout_s={timeout_s:.0f}"]


def run_overrides(federation: LocalFederation, run_dir: Path, *overrides: str,
                  timeout_s: float = RUN_TIMEOUT_S) -> list[str]:
    """A tiny run submitted to `federation`, outputs in `run_dir`."""
    return [*SMALL, *backend_overrides(federation, timeout_s), f"output_dir={run_dir}",
            *overrides]


@dataclass
class Command:
    """A `fedsim` process started by this script, stopped by its pid at the latest on exit."""

    args: list[str]
    log_dir: Path
    process: subprocess.Popen | None = None

    def __enter__(self) -> Command:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / "stdout").open("w") as out, (self.log_dir / "stderr").open("w") as err:
            self.process = subprocess.Popen(self.args, cwd=ROOT, stdout=out, stderr=err)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            for proc in reversed(_tree(self.process.pid)):
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            self.process.wait(timeout=30)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"`fedsim` did not end within {timeout:.0f} s; its output is in "
                               f"{self.log_dir}") from None

    @property
    def stderr(self) -> str:
        return (self.log_dir / "stderr").read_text()


def train_replies(row: dict[str, Any], sent: int) -> int:
    """How many train replies a round without federated evaluation got, of `sent` train
    messages: every reply uploads the model it was sent, so a reply's bytes are a
    message's (`bytes_down / sent`)."""
    return round(row["bytes_up"] / (row["bytes_down"] / sent))


def rows(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics rows a run wrote so far."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def server_log(run_dir: Path) -> str:
    """The ServerApp's log as `fedsim` streamed it so far (deployment/run.log)."""
    path = run_dir / "deployment" / "run.log"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_until(condition: Callable[[], Any], what: str, timeout: float = STEP_TIMEOUT_S,
               alive: Command | None = None) -> Any:
    """`condition()`'s first true value, polled every 0.2 s; raise after `timeout` s, or at
    once when `alive` ended meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        if alive is not None and alive.process.poll() is not None:
            raise RuntimeError(f"`fedsim` ended (exit {alive.process.returncode}) while waiting "
                               f"for {what}: {alive.stderr.strip()[-500:]}")
        time.sleep(0.2)
    raise TimeoutError(f"no {what} within {timeout:.0f} s")


def _tree(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def training(federation: LocalFederation, name: str) -> bool:
    """Whether SuperNode `name` runs a ClientApp right now (a `flwr-clientapp` below it)."""
    return any(proc.name().startswith("flwr-clientapp")
               for proc in _tree(federation.process(name).process.pid)[1:]
               if _alive(proc))


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def leftover_processes(federation: LocalFederation) -> list[int]:
    """Pids still running whose environment names the federation's FLWR_HOME."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if _alive(proc) and proc.environ().get("FLWR_HOME") == str(federation.flwr_home):
                found.append(proc.pid)
    return found


@dataclass
class MemoryWatch:
    """Samples the summed RSS of the federation's processes and of `fedsim`'s process tree
    every `interval` s, in a thread; `peak` is the largest sum seen (bytes)."""

    federation: LocalFederation
    command: Command
    interval: float = 0.5
    peak: int = 0
    peak_processes: int = 0
    peak_by_kind: dict[str, list[int]] = field(default_factory=dict)  # name: [count, rss]
    #: the least memory the system had available meanwhile (other programs' use included)
    min_available: int = field(default_factory=lambda: psutil.virtual_memory().available)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> MemoryWatch:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            procs = {p.pid: p for p in self.federation._members()}
            if self.command.process is not None:
                procs |= {p.pid: p for p in _tree(self.command.process.pid)}
            by_kind: dict[str, list[int]] = {}
            for proc in procs.values():
                with contextlib.suppress(psutil.Error):
                    kind = by_kind.setdefault(proc.name(), [0, 0])
                    kind[0] += 1
                    kind[1] += proc.memory_info().rss
            total = sum(rss for _, rss in by_kind.values())
            self.min_available = min(self.min_available, psutil.virtual_memory().available)
            if total > self.peak:
                self.peak, self.peak_processes = total, sum(n for n, _ in by_kind.values())
                self.peak_by_kind = by_kind


# ---- the scenarios ---------------------------------------------------------------------


def faults(work: Path, nodes: int = 3, rounds: int = 4) -> dict[str, Any]:
    """One run of `rounds` rounds on `nodes` SuperNodes (TLS, node authentication, the
    SuperLink's state in a file), a checkpoint after every round, and two faults:

    1. SuperNode 0 is killed (SIGKILL, with everything below it) while it trains in
       round 1, and restarted once the server logged its failure (it keeps its node id);
    2. the SuperLink is killed (SIGKILL, with its SuperExec and the ServerApp) once the
       checkpoint of round 2 is written, and restarted on the same ports and state file.

    Then `fedsim resume=<run dir>` goes on, on the same federation, to the end.
    """
    federation = LocalFederation(work / "federation", num_nodes=nodes, state_db=True)
    run_dir, victim = work / "run", "supernode-0"
    seconds: dict[str, float] = {}
    with federation:
        node_id = federation.node_id(victim)
        args = fedsim_command(*run_overrides(
            federation, run_dir, f"num_clients={nodes}", f"clients_per_round={nodes}",
            "evaluation.clients_per_round=0", f"num_rounds={rounds}", "checkpoint.every=1"))
        clock = Clock(seconds)
        with Command(args, work / "fedsim") as first, MemoryWatch(federation, first) as memory:
            wait_until(lambda: len(rows(run_dir)) >= 1 and training(federation, victim),
                       f"round 1 training on {victim}", alive=first)
            clock("start_to_kill")
            killed = federation.kill(victim)
            failure = wait_until(lambda: _failure_line(server_log(run_dir), node_id),
                                 f"a logged failure of node {node_id}", alive=first)
            clock("kill_to_failure_logged")
            federation.restart(victim)
            clock("node_restart")
            wait_until(lambda: checkpoint_round(run_dir) >= 2, "the checkpoint of round 2",
                       alive=first)
            clock("restart_to_checkpoint_2")
            federation.kill("superlink")
            federation.restart("superlink")
            clock("superlink_restart")
            first_code = first.wait(STEP_TIMEOUT_S)
            clock("restart_to_failure")
        node_id_after = federation.node_id(victim)
        restarted_log = federation.process(victim).log.read_text(errors="replace")
        rows_at_failure = rows(run_dir)
        nodes_online = wait_until(lambda: len(federation.online_nodes()) >= nodes and
                                  federation.online_nodes(), "every SuperNode back online")
        resume = fedsim_command(f"resume={run_dir}", *backend_overrides(federation))
        with Command(resume, work / "resume") as resumed:
            resume_code = resumed.wait(RUN_TIMEOUT_S)
            clock("resume")
    return {
        "nodes": nodes, "rounds": rounds, "node_id": node_id, "node_id_after": node_id_after,
        "killed_pids": killed, "failure_line": failure,
        "trained_after_restart": restarted_log.split(RESTARTED_MARK)[-1].count(
            "Receiving: train message"),
        "first_exit_code": first_code, "first_stderr": first.stderr,
        "rows_at_failure": rows_at_failure, "nodes_online_after_restart": nodes_online,
        "resume_exit_code": resume_code, "resume_stderr": resumed.stderr,
        "rows": rows(run_dir), "summary": (run_dir / "summary.json").exists(),
        "run_dir": str(run_dir), "server_log": server_log(run_dir),
        "peak_rss_bytes": memory.peak, "processes_at_peak": memory.peak_processes,
        "peak_by_kind": memory.peak_by_kind, "pids_file": federation.pids_file.read_text(),
        "leftover_pids": leftover_processes(federation), "seconds": seconds,
    }


def quick_restart(work: Path, nodes: int = 2, deadline_s: float | None = None,
                  run_timeout_s: float = 240.0) -> dict[str, Any]:
    """Kill SuperNode 0 while it trains in round 1 and restart it at once, as a supervisor
    would; `deadline_s` is the run's `faults.timeout_s` (None: no round deadline).

    The SuperLink refuses the node until its killed process missed its heartbeats;
    `LocalFederation.restart` starts it again every few seconds until it is taken.
    """
    federation = LocalFederation(work / "federation", num_nodes=nodes)
    run_dir, victim = work / "run", "supernode-0"
    deadline = "null" if deadline_s is None else f"{deadline_s:.0f}"
    with federation:
        node_id = federation.node_id(victim)
        args = fedsim_command(*run_overrides(
            federation, run_dir, f"num_clients={nodes}", f"clients_per_round={nodes}",
            "evaluation.clients_per_round=0", "num_rounds=2", f"faults.timeout_s={deadline}",
            timeout_s=run_timeout_s))
        with Command(args, work / "fedsim") as command:
            wait_until(lambda: len(rows(run_dir)) >= 1 and training(federation, victim),
                       f"round 1 training on {victim}", alive=command)
            killed_at = time.monotonic()
            federation.kill(victim)
            federation.restart(victim)
            back_s = time.monotonic() - killed_at
            code = command.wait(run_timeout_s + STEP_TIMEOUT_S)
            ended_s = time.monotonic() - killed_at
        starts = federation.process(victim).log.read_text(errors="replace").count(
            RESTARTED_MARK)
    return {
        "nodes": nodes, "deadline_s": deadline_s, "run_timeout_s": run_timeout_s,
        "node_id": node_id, "kill_to_back_s": back_s, "starts": starts,
        "kill_to_end_s": ended_s, "exit_code": code, "stderr": command.stderr,
        "rows": rows(run_dir), "failure_line": _failure_line(server_log(run_dir), node_id),
        "leftover_pids": leftover_processes(federation),
    }


@dataclass
class Clock:
    """`clock(name)` stores the seconds since the last call (or since it was made)."""

    seconds: dict[str, float]
    last: float = field(default_factory=time.monotonic)

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name], self.last = now - self.last, now


def checkpoint_round(run_dir: Path) -> int:
    """The round of the run's checkpoint, 0 while it has none (or one being replaced)."""
    from fedsim import checkpoint

    if not (run_dir / checkpoint.CHECKPOINT_FILE).exists():
        return 0
    try:
        return checkpoint.load(run_dir).server_round
    except Exception:  # noqa: BLE001 - a file caught mid-rename reads as none yet
        return 0


def _failure_line(log: str, node_id: int | None) -> str | None:
    """The server log's line that reports a failure of node `node_id`."""
    return next((line for line in log.splitlines()
                 if re.search(rf"client node\(?s?\)? \[?{node_id}\b", line)), None)


def scale(work: Path, nodes: int = 20, rounds: int = 3, evaluate: bool = True) -> dict[str, Any]:
    """`nodes` SuperNodes, all of them training (and with `evaluate`, evaluating) in each of
    `rounds` rounds: round times and the peak summed RSS."""
    federation = LocalFederation(work / "federation", num_nodes=nodes, tls=False,
                                 node_auth=False, node_timeout_s=STEP_TIMEOUT_S)
    run_dir = work / "run"
    timeout_s = RUN_TIMEOUT_S + 30.0 * nodes * rounds * (2 if evaluate else 1)
    available_before = psutil.virtual_memory().available
    start = time.monotonic()
    with federation:
        up_at = time.monotonic()
        args = fedsim_command(*run_overrides(
            federation, run_dir, f"num_clients={nodes}", f"clients_per_round={nodes}",
            f"evaluation.clients_per_round={nodes if evaluate else 0}", f"num_rounds={rounds}",
            timeout_s=timeout_s))
        with Command(args, work / "fedsim") as command, \
                MemoryWatch(federation, command) as memory:
            code = command.wait(timeout_s + STEP_TIMEOUT_S)
        ended_at = time.monotonic()
    done = rows(run_dir)
    return {
        "exit_code": code, "stderr": command.stderr, "nodes": nodes, "rounds": rounds,
        "start_federation_s": up_at - start, "run_s": ended_at - up_at,
        "round_time_s": [row["round_time_s"] for row in done[1:]],
        "peak_rss_bytes": memory.peak, "processes_at_peak": memory.peak_processes,
        "peak_by_kind": memory.peak_by_kind, "min_available_bytes": memory.min_available,
        "available_before_bytes": available_before, "rows": done, "run_dir": str(run_dir),
        "leftover_pids": leftover_processes(federation),
    }


# ---- report ------------------------------------------------------------------------------


def report(name: str, result: dict[str, Any]) -> None:
    """Print what a scenario measured."""
    print(f"\n== {name}")
    if name == "faults":
        print(f"node {result['node_id']} killed in round 1 (pids {result['killed_pids']}); "
              f"server log: {result['failure_line'].strip()}")
        for row in result["rows_at_failure"][1:]:
            print(f"  round {row['round']}: train replies {train_replies(row, result['nodes'])}, "
                  f"train_failures {row['train_failures']}, {row['round_time_s']:.1f} s")
        print(f"  train messages the restarted node received: "
              f"{result['trained_after_restart']} (node id after restart "
              f"{result['node_id_after']})")
        print(f"SuperLink restarted: first run exit {result['first_exit_code']}: "
              f"{result['first_stderr'].strip()}")
        print(f"resume: exit {result['resume_exit_code']}, rounds "
              f"{[row['round'] for row in result['rows']]}, summary {result['summary']}"
              f"{': ' + result['resume_stderr'].strip() if result['resume_exit_code'] else ''}")
        print(f"  peak RSS sum {result['peak_rss_bytes'] / 2**30:.2f} GiB over "
              f"{result['processes_at_peak']} processes")
        print_peak(result)
    elif name.startswith("quick"):
        done = [row["round"] for row in result["rows"][1:]]
        print(f"faults.timeout_s={result['deadline_s']}: node {result['node_id']} back "
              f"{result['kill_to_back_s']:.1f} s after the kill, after {result['starts']} starts "
              f"(the earlier ones refused); rounds completed {done}; exit "
              f"{result['exit_code']} {result['kill_to_end_s']:.1f} s after the kill"
              f"{': ' + result['stderr'].strip() if result['exit_code'] else ''}")
        print(f"  server log: {(result['failure_line'] or '(no failure logged)').strip()}")
    else:
        times = ", ".join(f"{t:.1f}" for t in result["round_time_s"])
        print(f"{result['nodes']} SuperNodes, {result['rounds']} rounds: started in "
              f"{result['start_federation_s']:.1f} s, run {result['run_s']:.1f} s, rounds "
              f"{times} s; peak RSS sum {result['peak_rss_bytes'] / 2**30:.2f} GiB over "
              f"{result['processes_at_peak']} processes; system memory available: "
              f"{result['available_before_bytes'] / 2**30:.1f} GiB before, at least "
              f"{result['min_available_bytes'] / 2**30:.1f} GiB during the run")
        print_peak(result)
    print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.get("seconds", {}).items()))
    print(f"  leftover processes: {result['leftover_pids'] or 'none'}")


def print_peak(result: dict[str, Any]) -> None:
    """The processes at the peak of the RSS sum, by kind, largest share first."""
    print("  at the peak: " + ", ".join(
        f"{count} {kind} {rss / 2**20:.0f} MiB" for kind, (count, rss) in sorted(
            result["peak_by_kind"].items(), key=lambda item: -item[1][1])))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("faults", "quick", "quick-deadline", "scale"),
                        action="append")
    parser.add_argument("--nodes", type=int, default=20, help="SuperNodes of `scale`")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of `scale`")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "deployment_faults",
                        help="where the federations and runs go (a fresh folder per call)")
    args = parser.parse_args(argv)
    work = args.work / time.strftime("%Y%m%d-%H%M%S")
    print(f"machine: {os.cpu_count()} CPU cores, "
          f"{psutil.virtual_memory().total / 2**30:.1f} GiB memory; outputs in {work}")
    scenarios = {"faults": lambda: faults(work / "faults"),
                 "quick": lambda: quick_restart(work / "quick"),
                 "quick-deadline": lambda: quick_restart(work / "quick-deadline",
                                                         deadline_s=QUICK_DEADLINE_S),
                 "scale": lambda: scale(work / "scale", args.nodes, args.rounds)}
    results = {}
    for name in args.only or scenarios:
        results[name] = scenarios[name]()
        report(name, results[name])
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups on `kill`
    sys.exit(main())
