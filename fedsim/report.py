"""`fedsim-report <multirun dir>`: one table and one plot over a Hydra sweep.

Every job directory of the sweep holds `summary.json` and Hydra's
`.hydra/overrides.yaml`. The swept variables are the override keys that take
more than one value; `seed` is averaged over (mean +/- std), `strategy` (and
any other categorical key) makes the series, the first numeric one is the
x-axis of the plot. An Optuna sweep (`hydra/sweeper=tune`, whose
`optimization_results.yaml` is in the sweep directory) also gets its best trial
and parameters first, and `report-trials.png`: every trial's value in order
with the best so far.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedsim.errors import FedsimError
from fedsim.plots import plt

AVERAGED = "seed"


def load_jobs(sweep_dir: Path, metric: str) -> list[dict[str, Any]]:
    """One dict per finished job: its overrides (key -> value) and the metric."""
    jobs = []
    for summary_file in sorted(sweep_dir.glob("**/summary.json")):
        overrides_file = summary_file.parent / ".hydra" / "overrides.yaml"
        if not overrides_file.exists():
            continue
        overrides = dict(
            item.lstrip("+").split("=", 1) for item in yaml.safe_load(overrides_file.read_text())
        )
        value = _lookup(json.loads(summary_file.read_text()), metric)
        if value is not None:
            jobs.append({"overrides": overrides, "value": float(value),
                         "job": summary_file.parent.name})
    if not jobs:
        raise FedsimError(f"no finished runs (summary.json + .hydra/overrides.yaml) in {sweep_dir}")
    return jobs


def _lookup(summary: dict[str, Any], metric: str) -> Any:
    return summary.get(metric, summary.get("final", {}).get(metric))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def swept_keys(jobs: list[dict[str, Any]]) -> list[str]:
    """Override keys with more than one value across jobs, in first-seen order."""
    values: dict[str, set[str]] = defaultdict(set)
    for job in jobs:
        for key, value in job["overrides"].items():
            values[key].add(value)
    return [k for k, v in values.items() if len(v) > 1 or k == "strategy"]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(jobs: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Group jobs by every swept key but the seed; mean, std and count per group."""
    keys = [k for k in swept_keys(jobs) if k != AVERAGED]
    groups: dict[tuple, list[float]] = defaultdict(list)
    for job in jobs:
        groups[tuple(job["overrides"].get(k, "") for k in keys)].append(job["value"])
    rows = []
    for group, values in groups.items():
        mean, std = mean_std(values)
        rows.append({**dict(zip(keys, group, strict=True)), "mean": mean, "std": std,
                     "n": len(values)})
    rows.sort(key=lambda r: tuple((_number(r[k]) is None, _number(r[k]) or 0, r[k])
                                  for k in keys))
    return keys, rows


def write_table(keys: list[str], rows: list[dict[str, Any]], metric: str, out: Path) -> None:
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*keys, "mean", "std", "n"])
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| " + " | ".join([*keys, f"{metric} (mean ± std)", "seeds"]) + " |",
        "|" + "---|" * (len(keys) + 2),
    ]
    for r in rows:
        lines.append(
            "| " + " | ".join([*(r[k] for k in keys), f"{r['mean']:.4f} ± {r['std']:.4f}",
                               str(r["n"])]) + " |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def seeds_note(rows: list[dict[str, Any]]) -> str:
    """What the error bars are: `mean ± std over 3 seeds` (`over 2-3 seeds` when n varies)."""
    low, high = min(r["n"] for r in rows), max(r["n"] for r in rows)
    count = str(low) if low == high else f"{low}-{high}"
    return f"mean ± std over {count} seed{'' if high == 1 else 's'}"


def report_figure(keys: list[str], rows: list[dict[str, Any]], metric: str) -> Figure:
    """Metric vs the first numeric swept key, one line per combination of the others (bars
    when no key is numeric); the title says what the error bars are."""
    numeric = [k for k in keys if all(_number(r[k]) is not None for r in rows)]
    fig, ax = plt.subplots(figsize=(6, 4))
    if numeric:
        _plot_lines(ax, keys, rows, numeric[0], metric)
    else:
        labels = [" ".join(r[k] for k in keys) for r in rows]
        ax.bar(labels, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=3)
    ax.set_ylabel(metric)
    ax.set_title(f"error bars: {seeds_note(rows)}", fontsize="medium")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    return fig


def _plot_lines(ax: Axes, keys: list[str], rows: list[dict[str, Any]], x_key: str,
                metric: str) -> None:
    """One error-bar line per combination of the keys other than `x_key`; a log x axis
    for a range of 20x or more, whole-number ticks for an integer one."""
    series: dict[tuple, list] = defaultdict(list)
    for r in rows:
        series[tuple(r[k] for k in keys if k != x_key)].append(r)
    for name, points in series.items():
        points.sort(key=lambda r: _number(r[x_key]))
        ax.errorbar([_number(r[x_key]) for r in points], [r["mean"] for r in points],
                    yerr=[r["std"] for r in points], marker="o", capsize=3,
                    label=" ".join(name) or metric)
    xs = [_number(r[x_key]) for r in rows]
    if min(xs) > 0 and max(xs) / min(xs) >= 20:
        ax.set_xscale("log")
    elif all(x.is_integer() for x in xs):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(x_key)


def plot_report(keys: list[str], rows: list[dict[str, Any]], metric: str, out: Path) -> None:
    """`report_figure` saved as `out`.png."""
    fig = report_figure(keys, rows, metric)
    fig.savefig(out.with_suffix(".png"), dpi=100)
    plt.close(fig)


OPTUNA_RESULTS = "optimization_results.yaml"  # what Hydra's Optuna sweeper writes


def trial_order(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs in launch order (Hydra numbers job directories 0, 1, ...)."""
    return sorted(jobs, key=lambda job: (_number(job["job"]) is None, _number(job["job"]) or 0))


def best_so_far(values: list[float], maximize: bool = True) -> list[float]:
    """The running best of `values` (max, or min when minimizing)."""
    pick = max if maximize else min
    out: list[float] = []
    for value in values:
        out.append(value if not out else pick(out[-1], value))
    return out


def optuna_section(sweep_dir: Path, jobs: list[dict[str, Any]], metric: str, out: Path) -> str:
    """The best trial and its parameters (Markdown), and the trials plot; "" if not Optuna."""
    results_file = sweep_dir / OPTUNA_RESULTS
    if not results_file.exists():
        return ""
    results = yaml.safe_load(results_file.read_text())
    params = {str(k): v for k, v in (results.get("best_params") or {}).items()}
    trials = trial_order(jobs)
    best = next((job for job in trials if all(
        _number(job["overrides"].get(k, "")) == _number(str(v))
        or job["overrides"].get(k) == str(v) for k, v in params.items())), None)
    values = [job["value"] for job in trials]
    maximize = best is None or best["value"] == max(values)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(len(values)), values, "o", label="trial")
    ax.plot(range(len(values)), best_so_far(values, maximize), "-", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_name("report-trials.png"), dpi=100)
    plt.close(fig)
    lines = [f"Optuna: {len(trials)} trials, best value {results.get('best_value')}"
             + (f" (job {best['job']})" if best else ""), "",
             "| best parameter | value |", "|---|---|",
             *(f"| {k} | {v} |" for k, v in params.items()), "",
             "![trials](report-trials.png)", "", ""]
    return "\n".join(lines)


def report(sweep_dir: Path, metric: str = "final_server_accuracy") -> Path:
    """Write report.md / report.csv / report.png into `sweep_dir` (and, for an Optuna
    sweep, its best trial and report-trials.png); return the .md path."""
    jobs = load_jobs(sweep_dir, metric)
    keys, rows = summarize(jobs)
    out = sweep_dir / "report"
    write_table(keys, rows, metric, out)
    plot_report(keys, rows, metric, out)
    optuna = optuna_section(sweep_dir, jobs, metric, out)
    if optuna:
        md = out.with_suffix(".md")
        md.write_text(optuna + md.read_text())
    return out.with_suffix(".md")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory")
    parser.add_argument("--metric", default="final_server_accuracy",
                        help="summary.json key (or a key of its 'final' block)")
    args = parser.parse_args(argv)
    try:
        path = report(args.sweep_dir, args.metric)
    except FedsimError as err:
        raise SystemExit(f"fedsim-report: error: {err}") from None
    print(path.read_text(), end="")
    print(f"\nwritten: {path}, {path.with_suffix('.csv')}, {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
