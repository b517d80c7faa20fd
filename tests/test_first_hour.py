"""What a new user meets first: Ctrl-C, command-line mistakes, folders left behind, --help."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsim.checkpoint import CHECKPOINT_FILE
from fedsim.cli import explain, interrupted_line

pytestmark = pytest.mark.long_running(seconds=110)  # started first: conftest.py

FEDSIM = [sys.executable, "-c", "from fedsim.cli import main; main()"]
TINY = ["logger=none", "progress=false", "model=mlp", "client.local_epochs=1", "num_clients=4",
        "clients_per_round=2", "evaluation.clients_per_round=0", "plots.enabled=false"]
ENV = {**os.environ, "HYDRA_FULL_ERROR": "0"}


def interruptible() -> None:
    """Ctrl-C as in a terminal: a suite started in the background (`make test &`) hands
    its children SIGINT ignored, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(args, cwd, timeout=300):
    return subprocess.run([*FEDSIM, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def rounds_written(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def test_ctrl_c_prints_one_line_with_the_resume_command_and_exits_130(tmp_path):
    proc = subprocess.Popen([*FEDSIM, *TINY, "num_rounds=100000", "checkpoint.every=2"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    deadline = time.monotonic() + 240
    run_dirs: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        run_dirs = list(tmp_path.glob("outputs/*/*"))
        if run_dirs and (run_dirs[0] / CHECKPOINT_FILE).exists() and rounds_written(
                run_dirs[0]) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, out[-3000:], err)
    assert "Traceback" not in err
    (line,) = error_lines(err)
    (run_dir,) = run_dirs
    shown = run_dir.relative_to(tmp_path)
    assert line.startswith("fedsim: interrupted after round ")
    assert f"go on with: fedsim resume={shown}" in line
    done = int(line.split("after round ")[1].split(" ")[0])
    checkpoint = int(line.split("last checkpoint: round ")[1].split(" ")[0])
    assert done == rounds_written(run_dir) - 1  # metrics.jsonl starts with round 0
    assert checkpoint % 2 == 0 and checkpoint <= done
    assert f"run directory: {shown}" in out  # said when the run starts


def test_a_resumed_run_logs_into_its_own_folder(tmp_path):
    # enough rounds that a loaded machine cannot finish them in the 0.05 s between the first
    # checkpoint and the signal (a round takes about 0.2 s; the resume runs the rest)
    proc = subprocess.Popen([*FEDSIM, *TINY, "num_rounds=30", "checkpoint.every=1"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        dirs = list(tmp_path.glob("outputs/*/*"))
        if dirs and (dirs[0] / CHECKPOINT_FILE).exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, out[-3000:], err)
    command = error_lines(err)[-1].split("go on with: ")[1].split()
    resumed = run(command[1:], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    (run_dir,) = list(tmp_path.glob("outputs/*/*"))  # no second, empty folder
    assert (run_dir / "summary.json").exists()
    assert (run_dir / ".hydra.resumed1" / "overrides.yaml").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()  # the first attempt's, kept
    assert "resuming the run in" in (run_dir / "cli.log").read_text()


@pytest.mark.parametrize(("args", "expected"), [
    (["strategy=fedavgg"], "fedsim: error: strategy=fedavgg: no such strategy option: did you "
                           "mean fedavg? (options: bulyan, "),
    (["num_round=10"], "fedsim: error: unknown key num_round: did you mean num_rounds?"),
    (["alpha=0.1"], "fedsim: error: unknown key alpha: did you mean partition.alpha?"),
    (["partition=iid", "partition.alpah=0.1"],
     "fedsim: error: unknown key partition.alpah (the settings of partition: "),
    (["+experiment=fedld_mnsit1d"], "fedsim: error: experiment=fedld_mnsit1d: no such experiment "
                                    "option: did you mean fedld_mnist1d?"),
    (["num_rounds=[1"], "fedsim: error: cannot read the override 'num_rounds=[1': "),
    (["resume=no/such/run"], "fedsim: error: resume: 'no/such/run' is not a directory"),
])
def test_command_line_mistakes_are_one_line_exit_2_and_leave_no_folder(tmp_path, args, expected):
    out = run(args, tmp_path)
    assert out.returncode == 2
    (line,) = error_lines(out.stderr)
    assert line.startswith(expected)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_config_leaves_no_run_folder(tmp_path):
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "keep.txt").write_text("a user's file")
    out = run([*TINY, "partition.alpha=-1"], tmp_path)
    assert out.returncode == 2
    assert error_lines(out.stderr) == [
        "fedsim: error: partition.alpha must be a number > 0 (or a list of them) (got -1)"]
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["keep.txt"]
    sweep = run(["-m", *TINY, "partition.alpha=-1,-2"], tmp_path)
    assert sweep.returncode == 2
    assert not (tmp_path / "multirun").exists()


def test_help_and_command_line_mistakes_do_not_import_torch_flower_or_ray(tmp_path):
    probe = ("import sys\nfrom fedsim.cli import main\nsys.argv = ['fedsim', *sys.argv[1:]]\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'flwr', 'ray'}))")
    for args in (["--help"], ["num_round=10"], ["strategy=fedavgg"]):
        out = subprocess.run([sys.executable, "-c", probe, *args], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.strip().splitlines()[-1] == "[]", (args, out.stdout, out.stderr)


def test_interrupted_line_without_a_checkpoint(tmp_path):
    rows = [{"round": r} for r in range(4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = interrupted_line(tmp_path, 10)
    assert line.startswith("fedsim: interrupted after round 3 of 10; no checkpoint yet")
    assert "resume=" not in line
    assert interrupted_line(tmp_path, 10, started=False) == (
        "fedsim: interrupted before the first round; nothing was written")


def test_explain_falls_back_to_the_first_line_of_other_errors():
    from hydra.errors import HydraException

    assert explain(HydraException("first line\nsecond"), []) == "first line"


def test_a_method_from_outside_fedsim_runs_and_its_bad_value_is_one_line(tmp_path):
    """A strategy and a trainer from a package outside fedsim (tests/helpers.py), selected
    by `_target_` alone: no engine edit, and their own checks give fedsim's one line."""
    env = {**ENV, "PYTHONPATH": str(Path(__file__).parent)}
    outside = ["strategy._target_=helpers.ThresholdFedAvg", "+strategy.threshold=0.5",
               "client._target_=helpers.ScaledLossTrainer", "+client.scale=2.0"]
    good = subprocess.run([*FEDSIM, *TINY, *outside, "num_rounds=1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    bad = subprocess.run([*FEDSIM, *TINY, *outside, "client.scale=0"], cwd=tmp_path / "outputs",
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert error_lines(bad.stderr) == ["fedsim: error: client.scale must be a number > 0 (got 0)"]
