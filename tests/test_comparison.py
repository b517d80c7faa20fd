"""Comparison grids: cells, resuming, and the numbers that go into docs/results."""

import json
import math
import subprocess
from pathlib import Path

import pytest
from conftest import TINY
from omegaconf import OmegaConf

from fedsim import comparison
from fedsim.comparison import (
    Cell,
    Grid,
    best_setting,
    current_commit,
    first_round_at_least,
    markdown_table,
    mean_last,
    mean_std,
    metric_at,
    run_missing,
    summarize,
)
from fedsim.config import compose
from fedsim.recording import code_fingerprint

ROWS = [{"round": 0, "acc": 0.1}, {"round": 1, "acc": 0.3}, {"round": 2, "acc": 0.5},
        {"round": 3, "acc": 0.4}]


def test_metric_at_and_mean_last():
    assert metric_at(ROWS, "acc", 2) == 0.5
    assert metric_at(ROWS, "acc", 99) == 0.4  # fewer rounds than asked: the last
    assert math.isnan(metric_at(ROWS, "missing", 2))
    assert mean_last(ROWS, "acc", 2, 3) == pytest.approx(0.45)
    assert mean_last(ROWS, "acc", 5, 2) == pytest.approx(0.4)  # round 0 is not a trained round


def test_first_round_at_least_skips_round_zero_and_gaps():
    rows = [{"round": 0, "acc": 0.9}, {"round": 1, "acc": 0.4}, {"round": 2},
            {"round": 3, "acc": None}, {"round": 4, "acc": 0.7}, {"round": 5, "acc": 0.6}]
    assert first_round_at_least(rows, "acc", 0.7) == 4.0
    assert first_round_at_least(rows, "acc", 0.3) == 1.0
    assert math.isnan(first_round_at_least(rows, "acc", 0.8))


def test_best_setting_takes_the_highest_mean_and_the_first_on_ties():
    assert best_setting({0.001: [0.6, 0.8], 0.01: [0.9, 0.4], 0.1: [0.1, 0.2]}) == 0.001
    assert best_setting({"a": [0.25, 0.75], "b": [0.5, 0.5]}) == "a"  # exact in binary
    assert best_setting({"nan": [math.nan, 0.9], "low": [0.1, 0.1]}) == "low"


def test_mean_std_is_the_sample_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([5.0]) == (5.0, 0.0)


def test_markdown_table_bolds_the_best_mean():
    stats = {("d", 0.1, "A"): (0.5, 0.01, 3), ("d", 0.1, "B"): (0.6, 0.02, 3)}
    table = markdown_table(stats, ["A", "B"], "alpha")
    assert table.splitlines()[-1] == "| d | 0.1 | 50.0 ± 1.0 | **60.0 ± 2.0** |"


def test_grid_gives_every_cell_the_same_partition_inputs(tmp_path):
    grid = Grid(methods={"A": ["strategy=fedavg"], "B": ["strategy=fedprox"]},
                datasets={"d": ["dataset=digits"]}, value_key="partition.alpha",
                values=[0.1, 1.0], seeds=[0, 1], runs_dir=tmp_path)
    cells = grid.cells()
    assert len(cells) == 8 and len({c.run_dir for c in cells}) == 8
    a, b = cells[0], cells[1]
    assert (a.method, b.method) == ("A", "B")
    assert set(a.overrides) - set(b.overrides) == {
        "strategy=fedavg", f"output_dir={a.run_dir.resolve()}"}
    assert "partition.alpha=0.1" in a.overrides and "seed=0" in a.overrides


def test_run_missing_runs_once_and_sets_half_written_runs_aside(tmp_path):
    grid = Grid(methods={"FedAvg": []}, datasets={"mnist1d": []}, value_key="partition.alpha",
                values=[0.5], seeds=[0], base=TINY, runs_dir=tmp_path)
    (cell,) = grid.cells()
    cell.run_dir.mkdir(parents=True)
    (cell.run_dir / "metrics.jsonl").write_text('{"round": 0}\n')  # an interrupted run
    messages: list[str] = []
    run_missing(grid.cells(), workers=1, log=messages.append)
    assert cell.finished
    kept = cell.run_dir.with_name(cell.run_dir.name + ".old1")
    assert (kept / "metrics.jsonl").read_text() == '{"round": 0}\n'
    first = (cell.run_dir / "summary.json").read_text()
    run_missing(grid.cells(), workers=1, log=messages.append)
    assert messages[-1] == "1 of 1 runs already finished; running 0"
    assert (cell.run_dir / "summary.json").read_text() == first
    stats = summarize([cell], lambda rows: metric_at(rows, "server/accuracy", 2))
    final = json.loads(first)["final"]["server/accuracy"]
    assert stats[("mnist1d", 0.5, "FedAvg")] == (final, 0.0, 1)
    # a run written by other code is not reused
    summary = json.loads(first)
    summary["code"] = "older-code"
    (cell.run_dir / "summary.json").write_text(json.dumps(summary))
    assert not cell.finished


def test_cell_is_finished_only_with_a_summary_of_this_code_and_config(tmp_path):
    overrides = ("num_rounds=3", f"output_dir={tmp_path / 'run'}")
    cell = Cell("A", "d", 1.0, 0, overrides, tmp_path / "run")
    assert not cell.finished
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    assert not cell.finished  # no code fingerprint: unknown code
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"code": code_fingerprint()}))
    assert not cell.finished  # no stored config
    OmegaConf.save(compose(list(overrides)), tmp_path / "run" / "config.yaml", resolve=True)
    assert cell.finished
    # the same folder asked for with other overrides (another --set, other rounds)
    assert not Cell("A", "d", 1.0, 0, ("num_rounds=4", overrides[1]), tmp_path / "run").finished


def test_current_commit_names_the_checkout_or_says_unknown(monkeypatch, tmp_path):
    checkout = Path(comparison.__file__).resolve().parents[1]
    assert current_commit() == (subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=checkout).stdout.strip() or "unknown")
    # a wheel installed in a venv that lies inside some other checkout
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    installed = tmp_path / ".venv" / "site-packages" / "fedsim" / "comparison.py"
    monkeypatch.setattr(comparison, "__file__", str(installed))
    installed.parent.mkdir(parents=True)
    assert current_commit() == "unknown"
    monkeypatch.undo()
    monkeypatch.setenv("GIT_DIR", "/nonexistent")  # as outside a checkout: git fails
    assert current_commit() == "unknown"
    monkeypatch.setenv("PATH", "/nonexistent")  # no git at all
    assert current_commit() == "unknown"
