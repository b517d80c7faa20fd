"""One run per run directory, refused runs that touch nothing, and the disk and signals as
one line (issue #25): the claim in `fedsim.run_dir`, the CLI around it, and
`fedsim.reachability`."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsim.errors import ConfigError
from fedsim.reachability import connect_problem, host_and_port
from fedsim.run_dir import CLAIM_FILE, claim, holds, release

pytestmark = pytest.mark.long_running(seconds=90)  # started first: conftest.py

FEDSIM = [sys.executable, "-c", "from fedsim.cli import main; main()"]
TINY = ["logger=none", "progress=false", "model=mlp", "dataset=digits", "client.local_epochs=1",
        "num_clients=4", "clients_per_round=2", "evaluation.clients_per_round=0",
        "checkpoint.every=1", "plots.enabled=false"]


def run_cli(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([*FEDSIM, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, **kwargs)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("fedsim: ")]


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) with its content hash and mtime."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            + f"@{p.stat().st_mtime_ns}" for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- the claim itself ---------------------------------------------------------------------


def _contender(run_dir: str, barrier, results, done) -> None:
    barrier.wait()
    try:
        claim(Path(run_dir))
        results.put("won")
    except ConfigError as err:
        results.put(str(err))
    done.wait(30)  # the winner holds its claim while the others try, as a run does


def test_of_runs_released_together_exactly_one_claims_the_directory(tmp_path):
    """The issue's race, barrier-synchronized, 25 times with 4 contenders: before the claim,
    files-exist checks let two runs through in 1 of 4 tries."""
    ctx = multiprocessing.get_context("fork")
    for attempt in range(25):
        run_dir = tmp_path / f"run{attempt}"
        barrier, results, done = ctx.Barrier(4), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_contender, args=(str(run_dir), barrier, results, done))
                 for _ in range(4)]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=30) for _ in procs]
        done.set()
        for proc in procs:
            proc.join(30)
        assert outcomes.count("won") == 1, outcomes
        assert all("in use by another fedsim run" in o for o in outcomes if o != "won")


def test_a_claim_is_held_until_released_and_then_checks_the_contents(tmp_path):
    run_dir = claim(tmp_path / "run")
    assert holds(run_dir) and (run_dir / CLAIM_FILE).is_file()
    assert claim(run_dir) == run_dir  # this process already holds it
    (run_dir / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a run"):
        claim(run_dir)
    assert not holds(run_dir)  # a refused claim is dropped
    with pytest.raises(ConfigError, match="has finished"):
        claim(run_dir, fresh=False)
    release(run_dir)


def test_a_path_that_is_a_file_or_under_one_is_named(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for path in (afile, afile / "sub"):
        with pytest.raises(ConfigError, match="is a file or lies under a file"):
            claim(path, field="hydra.run.dir")
    assert afile.read_text() == "keep me"


def test_a_read_only_place_is_named(tmp_path):
    """/sys is mounted read-only here (root ignores file permissions, a mount it cannot)."""
    try:
        os.mkdir("/sys/fedsim-probe")
    except OSError:
        pass
    else:  # pragma: no cover - a writable /sys
        os.rmdir("/sys/fedsim-probe")
        pytest.skip("/sys is writable on this machine")
    with pytest.raises(ConfigError, match=r"output_dir '/sys/fedsim-run' cannot be"):
        claim(Path("/sys/fedsim-run"))


# ---- the CLI: two runs, one directory ----------------------------------------------------


def test_two_cli_runs_started_together_on_one_directory_do_not_mix(tmp_path):
    """The issue's reproduction: seed 0 and seed 1 with the same hydra.run.dir, started at
    once. One runs, the other is refused with one line; the folder holds one run."""
    run_dir = tmp_path / "shared"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    procs = [subprocess.Popen([*FEDSIM, *TINY, "num_rounds=3", f"seed={seed}",
                               f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (0, 1)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    codes = sorted(proc.returncode for proc in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)][1]
    assert len(error_lines(loser)) == 1 and ("in use by another fedsim run" in loser
                                             or "already holds a run" in loser), loser
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    summary = json.loads((run_dir / "summary.json").read_text())
    winner_seed = (0, 1)[[p.returncode for p in procs].index(0)]
    assert summary["seed"] == winner_seed
    assert f"seed: {winner_seed}" in (run_dir / "config.yaml").read_text()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("finished")
    out = run_cli([*TINY, "num_rounds=2", "hydra.run.dir=done"], cwd)
    assert out.returncode == 0, out.stderr
    return cwd / "done"


@pytest.mark.parametrize("args", [
    ["hydra.run.dir={run}", "seed=1"],
    ["resume={run}"],
    ["resume={run}", "hydra.run.dir={run}"],
    ["output_dir={run}", "hydra.run.dir={run}"],
])
def test_a_refused_run_leaves_a_finished_folder_byte_identical(finished_run, args):
    """Before the claim, Hydra rewrote the finished run's .hydra/ files, then fedsim refused."""
    before = tree_digest(finished_run)
    out = run_cli([*TINY, *(a.format(run=finished_run) for a in args)], finished_run.parent)
    assert out.returncode == 2, out.stderr
    assert len(error_lines(out.stderr)) == 1, out.stderr
    assert tree_digest(finished_run) == before
    assert sorted(os.listdir(finished_run.parent)) == ["done"]  # no new empty run folder


def test_a_run_dir_that_is_a_file_is_one_line_and_the_file_is_kept(tmp_path):
    (tmp_path / "afile").write_text("keep me")
    for target in ("afile", "afile/sub"):
        out = run_cli([*TINY, f"hydra.run.dir={target}"], tmp_path)
        assert out.returncode == 2
        assert error_lines(out.stderr) == [
            f"fedsim: error: hydra.run.dir '{target}' is a file or lies under a file; choose a "
            "directory path (a new one, or an unfinished run's to resume)"]
    assert (tmp_path / "afile").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["afile"]


# ---- the disk and signals ----------------------------------------------------------------


def _small_files() -> None:
    """In the child: files stop growing at 40 kB (write fails with EFBIG, as on a full
    disk, instead of the SIGXFSZ that would kill it)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))


def test_a_full_disk_is_one_line_and_keeps_what_was_written(tmp_path):
    """metrics.jsonl outgrows the limit after some rounds; the run stops with one line naming
    the file, the rows written stay, the last checkpoint is whole and no temp file is left."""
    out = run_cli([*TINY, "num_rounds=200", "hydra.run.dir=run", "model.hidden=[4]"], tmp_path,
                  preexec_fn=_small_files)
    assert out.returncode == 1, out.stderr
    (line,) = error_lines(out.stderr)
    assert line.startswith("fedsim: error: cannot write ") and "File too large" in line, line
    assert "fedsim resume=run" in line, line
    run_dir = tmp_path / "run"
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) > 5 and all(json.loads(r)["round"] >= 0 for r in rows[:-1])
    assert not list(run_dir.glob("*.tmp*")), os.listdir(run_dir)
    assert "Traceback" not in out.stderr


def _wait_for(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} did not appear in {timeout_s} s")


def test_sigterm_on_ray_is_one_line_with_the_resume_command(tmp_path):
    """ray.init replaced the process's SIGTERM handler: `kill` gave a KeyboardInterrupt
    traceback instead of fedsim's line."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen([*FEDSIM, *TINY, "backend=ray", "num_rounds=500",
                             "hydra.run.dir=run"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(tmp_path / "run" / "checkpoint.npz", 180)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    (line,) = error_lines(stderr)
    assert line.startswith("fedsim: interrupted after round ") and "fedsim resume=run" in line
    assert "Traceback" not in stderr


# ---- reachability --------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "expected"), [
    ("10.0.0.1:6379", ("10.0.0.1", 6379)),
    ("ray://head.local:10001", ("head.local", 10001)),
    ("head.local", ("head.local", 6379)),
    ("https://api.wandb.ai", ("api.wandb.ai", 6379)),
    ("host:port", None),
    (":6379", None),
])
def test_host_and_port(address, expected):
    assert host_and_port(address, 6379) == expected


def test_connect_problem_names_a_refused_port_and_accepts_a_listening_one():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert connect_problem("127.0.0.1", server.getsockname()[1]) is None
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
        free.close()
    assert connect_problem("127.0.0.1", port) == "Connection refused"
