"""Method comparisons: a grid of runs, executed once each, summarized as mean ± std.

The comparison scripts in `scripts/` name their methods (override lists), the
datasets, the swept values and the seeds; this module runs every cell that has
no finished run yet (several at a time, one process each), reads the runs'
`metrics.jsonl` back, and writes the table and plot that go into `docs/results/`.
A run finished by the current code (same `code_fingerprint`) is never redone,
so an interrupted comparison resumes where it stopped; runs of other code are
kept aside and redone, so a table never mixes code versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim.recording import code_fingerprint, set_aside
from fedsim.report import mean_std
from fedsim.run_dir import CONFIG_FILE


@dataclass(frozen=True)
class Cell:
    """One run of the grid: which method, on what, with which seed."""

    method: str
    dataset: str
    value: float
    seed: int
    overrides: tuple[str, ...]
    run_dir: Path

    @property
    def finished(self) -> bool:
        """A summary exists, written by the current code (same fingerprint) for this cell's
        config (the stored one equals the cell's overrides composed, so a run made with
        other `--set` overrides or rounds in the same folder is not taken for this one)."""
        summary = self.run_dir / "summary.json"
        if not summary.exists():
            return False
        if json.loads(summary.read_text()).get("code") != code_fingerprint():
            return False
        return same_config(self.run_dir / CONFIG_FILE, self.overrides)


@dataclass
class Grid:
    """methods x datasets x values x seeds, every cell with its own run directory.

    `methods` and `datasets` map a label to the overrides it adds; `value_key`
    is the swept config key (e.g. `partition.alpha`); `base` applies to all;
    `pairs` adds overrides for one (method, dataset) pair (e.g. its model).
    """

    methods: dict[str, list[str]]
    datasets: dict[str, list[str]]
    value_key: str
    values: Sequence[float]
    seeds: Sequence[int]
    base: list[str] = field(default_factory=list)
    runs_dir: Path = Path("outputs/comparison")
    pairs: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        cells = []
        for dataset, dataset_overrides in self.datasets.items():
            for value in self.values:
                for seed in self.seeds:
                    for method, method_overrides in self.methods.items():
                        run_dir = self.runs_dir / slug(dataset) / slug(method) / f"{value}" \
                            / f"seed{seed}"
                        overrides = (*self.base, *dataset_overrides, *method_overrides,
                                     *self.pairs.get((method, dataset), []),
                                     f"{self.value_key}={value}", f"seed={seed}",
                                     f"output_dir={run_dir.resolve()}")
                        cells.append(Cell(method, dataset, value, seed, overrides, run_dir))
        return cells


def same_config(stored: Path, overrides: Sequence[str]) -> bool:
    """Whether the config a run stored is the one `overrides` compose to (resolved)."""
    from omegaconf import OmegaConf

    from fedsim.config import compose

    if not stored.exists():
        return False
    wanted = OmegaConf.to_container(compose(list(overrides)), resolve=True)
    return OmegaConf.to_container(OmegaConf.load(stored)) == wanted


def add_grid_arguments(parser: argparse.ArgumentParser, name: str, rounds: int) -> None:
    """The options every comparison script shares: seeds, rounds, workers, where runs go."""
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs-dir", type=Path, default=Path(f"outputs/compare_{name}"))
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra overrides for every run (e.g. client.lr=0.01)")
    parser.add_argument("--out", type=Path, default=Path(f"docs/results/{name}"),
                        help="writes OUT.md, OUT.png and OUT.json")


def current_commit() -> str:
    """The short commit id of the checkout fedsim runs from, which a results page or bench
    record names; "unknown" without git, or when fedsim is not a checkout's own package (an
    installed wheel, even one in a venv inside some other checkout)."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "--short", "HEAD"],
                             capture_output=True, text=True, cwd=root)
    except OSError:
        return "unknown"
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root:
        return "unknown"
    return lines[1]


def provenance(script: str, cells: Sequence[Cell], workers: int) -> str:
    """Where a results page comes from: command, date, commit, code fingerprint (the one
    its runs recorded: `scripts/regenerate_results.py --check` compares it with the
    current code's), machine, runs and run time."""
    import torch

    run_s = sum(read_rows(cell.run_dir)[-1]["wall_time_s"] for cell in cells)
    command = f"python {script} {shlex.join(sys.argv[1:])}".strip()
    return (f"Generated by `{command}` on {datetime.date.today()} (commit {current_commit()}, "
            f"code {code_fingerprint()},\n"
            f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}): "
            f"{len(cells)} runs,\n{run_s / 60:.1f} min of run time in all, {workers} at a time.")


def write_outputs(out: Path, text: str, tables: dict[str, dict]) -> None:
    """OUT.md (`text`) and OUT.json: every table's (mean, std, seeds) by
    "dataset | value | method"."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    raw = {name: {" | ".join(map(str, k)): v for k, v in table.items()}
           for name, table in tables.items()}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    print(f"wrote {out.with_suffix('.md')}")


def run_and_report(args: argparse.Namespace, grid: Grid,
                   report: Callable[[argparse.Namespace, Grid], None]) -> None:
    """A comparison script's main: run the missing cells, then `report` unless
    `--no-report` was given."""
    run_missing(grid.cells(), args.workers)
    if args.report:
        report(args, grid)


def slug(label: str) -> str:
    """A label as a path part that Hydra's override parser accepts."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")


def run_cell(overrides: Sequence[str]) -> None:
    """One run in this process (the pool's unit of work).

    Errors come back as a RuntimeError naming the run: some library exceptions
    cannot cross the process boundary as themselves.
    """
    from fedsim.config import compose
    from fedsim.experiment import run_experiment

    try:
        run_experiment(compose(list(overrides)))
    except Exception as err:
        message = f"run {' '.join(overrides)} failed: {type(err).__name__}: {err}"
        raise RuntimeError(message) from None


def run_missing(cells: Sequence[Cell], workers: int, log: Callable[[str], None] = print) -> None:
    """Run every unfinished cell, `workers` at a time.

    A half-written run, or one written by other code, is kept under another name
    (`<dir>.old<n>`) and run again.
    """
    todo = [cell for cell in cells if not cell.finished]
    for cell in todo:
        if cell.run_dir.exists():
            set_aside(cell.run_dir, "old")
    log(f"{len(cells) - len(todo)} of {len(cells)} runs already finished; running {len(todo)}")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(run_cell, cell.overrides): cell for cell in todo}
        for done, (future, cell) in enumerate(futures.items(), start=1):
            future.result()
            log(f"[{done}/{len(todo)}] {cell.dataset} {cell.method} {cell.value} seed {cell.seed}")


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The run's per-round metrics (round 0 first)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def metric_at(rows: list[dict[str, Any]], key: str, round_: int) -> float:
    """`key` at round `round_` (the last round if there are fewer)."""
    usable = [r for r in rows if key in r and r["round"] <= round_]
    return float(usable[-1][key]) if usable else math.nan


def first_round_at_least(rows: list[dict[str, Any]], key: str, target: float) -> float:
    """The first round >= 1 whose `key` is at least `target` (nan: never; a row without
    the key, or with None for a non-finite value, does not count)."""
    hits = [r["round"] for r in rows
            if r["round"] >= 1 and r.get(key) is not None and r[key] >= target]
    return float(hits[0]) if hits else math.nan


def best_setting(finals: dict[Any, list[float]]) -> Any:
    """The setting with the highest mean final value (the first such, on ties); a mean
    that is not finite (a diverged run) ranks last."""
    def score(setting: Any) -> float:
        mean = statistics.fmean(finals[setting])
        return mean if math.isfinite(mean) else -math.inf

    return max(finals, key=score)


def mean_last(rows: list[dict[str, Any]], key: str, count: int, round_: int) -> float:
    """Mean of `key` over the last `count` rounds up to `round_` (smooths round noise)."""
    values = [float(r[key]) for r in rows if key in r and 1 <= r["round"] <= round_]
    return statistics.fmean(values[-count:]) if values else math.nan


def summarize(
    cells: Sequence[Cell], measure: Callable[[list[dict[str, Any]]], float]
) -> dict[tuple[str, float, str], tuple[float, float, int]]:
    """(dataset, value, method) -> (mean, std, seeds) of `measure(rows)` over seeds."""
    groups: dict[tuple[str, float, str], list[float]] = {}
    for cell in cells:
        groups.setdefault((cell.dataset, cell.value, cell.method), []).append(
            measure(read_rows(cell.run_dir))
        )
    return {key: (*mean_std(v), len(v)) for key, v in groups.items()}


def markdown_table(
    stats: dict[tuple[str, float, str], tuple[float, float, int]],
    methods: Sequence[str],
    value_label: str,
    scale: float = 100.0,
    precision: int = 1,
    bold_best: bool = True,
) -> str:
    """Rows dataset x value, a column per method, `mean ± std`; the best mean in bold."""
    lines = [f"| dataset | {value_label} | " + " | ".join(methods) + " |",
             "|---|---:|" + "---:|" * len(methods)]
    for dataset, value in dict.fromkeys((d, v) for d, v, _ in stats):
        means = {m: stats[(dataset, value, m)][0] for m in methods}
        best = max(means.values())
        cells = []
        for m in methods:
            mean, std, _ = stats[(dataset, value, m)]
            text = f"{scale * mean:.{precision}f} ± {scale * std:.{precision}f}"
            cells.append(f"**{text}**" if bold_best and mean == best else text)
        lines.append(f"| {dataset} | {value:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_methods(
    stats: dict[tuple[str, float, str], tuple[float, float, int]],
    methods: Sequence[str],
    value_label: str,
    ylabel: str,
    out: Path,
    log_x: bool = True,
) -> None:
    """One panel per dataset: the measure against the swept value, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(d for d, _, _ in stats))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        values = sorted({v for d, v, _ in stats if d == dataset})
        for method in methods:
            mean = [stats[(dataset, v, method)][0] for v in values]
            std = [stats[(dataset, v, method)][1] for v in values]
            ax.errorbar(values, mean, yerr=std, marker="o", capsize=3, label=method)
        if log_x:
            ax.set_xscale("log")
        ax.set(title=dataset, xlabel=value_label, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
