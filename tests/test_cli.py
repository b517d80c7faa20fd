"""The `fedsim` and `fedsim-report` commands as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.long_running(seconds=150)  # started first: conftest.py

FEDSIM = [sys.executable, "-c", "from fedsim.cli import main; main()"]
REPORT = [sys.executable, "-m", "fedsim.report"]
TINY = ["logger=none", "progress=false", "model=mlp", "client.local_epochs=1", "num_clients=4",
        "clients_per_round=2", "num_rounds=2", "evaluation.clients_per_round=0",
        "plots.enabled=false"]


def run(cmd, cwd):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_run_writes_a_run_directory(tmp_path):
    out = run([*FEDSIM, *TINY, "strategy=fedprox", "partition=dirichlet",
               "partition.alpha=0.5"], tmp_path)
    assert out.returncode == 0, out.stderr
    (run_dir,) = list((tmp_path / "outputs").glob("*/*"))
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((run_dir / "summary.json").read_text())["strategy"] == "FedProx"


def test_bad_value_exits_2_with_one_line_naming_the_field(tmp_path):
    out = run([*FEDSIM, *TINY, "partition=dirichlet", "partition.alpha=-1"], tmp_path)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("fedsim: error")]
    assert errors == ["fedsim: error: partition.alpha must be a number > 0 (or a list of them) "
                      "(got -1)"]
    assert not list(tmp_path.glob("outputs/*/*/metrics.jsonl"))


def test_unknown_strategy_name_lists_the_choices(tmp_path):
    out = run([*FEDSIM, *TINY, "strategy=fedfoo"], tmp_path)
    assert out.returncode != 0
    assert "fedfoo" in out.stderr and "fedavg" in out.stderr


def test_multirun_sweep_and_report(tmp_path):
    out = run([*FEDSIM, "-m", *TINY, "strategy=fedavg,fedprox", "partition=dirichlet",
               "partition.alpha=0.1,10", "seed=0,1"], tmp_path)
    assert out.returncode == 0, out.stderr
    (sweep,) = list((tmp_path / "multirun").glob("*/*"))
    assert len(list(sweep.glob("*/summary.json"))) == 8
    rep = run([*REPORT, str(sweep)], tmp_path)
    assert rep.returncode == 0, rep.stderr
    table = (sweep / "report.md").read_text().splitlines()
    assert table[0].startswith("| strategy | partition.alpha |") or table[0].startswith(
        "| partition.alpha | strategy |")
    assert len(table) == 2 + 4 and all(line.endswith("| 2 |") for line in table[2:])
    assert (sweep / "report.png").stat().st_size > 0
    assert Path(sweep / "report.csv").read_text().count("\n") == 5


def test_an_optuna_sweep_of_three_trials_and_its_report(tmp_path):
    sweep = tmp_path / "sweep"
    out = run([*FEDSIM, "-m", "hydra/sweeper=tune", "client.lr=interval(0.001,0.3)",
               "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}", *TINY], tmp_path)
    assert out.returncode == 0, out.stderr
    finals = [json.loads(p.read_text())["final_server_accuracy"]
              for p in sweep.glob("*/summary.json")]
    assert len(finals) == 3
    reported = run([*REPORT, str(sweep)], tmp_path)
    assert reported.returncode == 0, reported.stderr
    text = (sweep / "report.md").read_text()
    assert text.startswith(f"Optuna: 3 trials, best value {max(finals)}")  # maximized
    assert "| client.lr |" in text and (sweep / "report-trials.png").stat().st_size > 0


def test_report_on_an_empty_directory_says_so(tmp_path):
    rep = run([*REPORT, str(tmp_path)], tmp_path)
    assert rep.returncode != 0 and "no finished runs" in rep.stderr


def test_presets_compose(tmp_path):
    from fedsim.config import compose, validate

    w1 = compose(["+experiment=w1", f"output_dir={tmp_path}"])
    assert (w1.num_clients, w1.clients_per_round, w1.num_rounds) == (100, 20, 50)
    assert w1.model._target_ == "fedsim.models.MLP" and w1.client.momentum == 0.0
    central = compose(["+experiment=centralized", f"output_dir={tmp_path}"])
    validate(w1)
    validate(central)
    assert central.num_clients == central.clients_per_round == 1


def test_cli_run_on_the_ray_backend(tmp_path):
    out = run([*FEDSIM, *TINY, "backend=ray", "backend.num_actors=2"], tmp_path)
    assert out.returncode == 0, out.stderr
    (run_dir,) = list((tmp_path / "outputs").glob("*/*"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 2 and rows[-1]["bytes_up"] > 0


def test_tensorboard_logger_writes_every_scalar_of_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny = [arg for arg in TINY if arg != "logger=none"]
    out = run([*FEDSIM, *tiny, "logger=tensorboard", "logger.flush_secs=1"], tmp_path)
    assert out.returncode == 0, out.stderr
    (run_dir,) = list((tmp_path / "outputs").glob("*/*"))
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = {(key, row["round"]): value for row in rows for key, value in row.items()
                if key != "round" and isinstance(value, int | float)}
    logged = {(tag, e.step): e.value for tag in events.Tags()["scalars"]
              for e in events.Scalars(tag)}
    assert logged.keys() == expected.keys()
    # TensorBoard stores scalars as float32: equal up to its rounding
    assert all(abs(logged[k] - v) <= 1e-6 * max(1.0, abs(v)) for k, v in expected.items())
    assert "config" in str(events.Tags()["tensors"])


def test_wandb_logger_writes_an_offline_run(tmp_path):
    tiny = [arg for arg in TINY if arg != "logger=none"]
    out = run([*FEDSIM, *tiny, "logger=wandb"], tmp_path)
    assert out.returncode == 0, out.stderr
    (run_dir,) = list((tmp_path / "outputs").glob("*/*"))
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))
