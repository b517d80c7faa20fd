"""Stale-update rules under intertwined heterogeneity: docs/results/staleness.{md,png,json}.

Every run is the `staleness` preset: 50 clients holding 2 classes each
(pathological partition), 10 a round, 5 full-batch GD steps at lr 0.5, MLP, on
digits and MNIST-1D; the holders of class 5 are the slow devices. Per delay
(rounds late, `--delays`) and seed (`--seeds`):

- synchronous rounds, slow updates computed on the model of `delay` rounds ago
  (in the first `delay` rounds on the current one, as in the reference:
  `strategy.startup=reference`; `--set strategy.startup=initial` for the other rule):
  direct stale aggregation, 2^(-tau/20) weighting, FedAsync's (1 + tau)^-1/2
  weighting, DC-ASGD's first-order correction (lam 4), staleness inversion
  (100 inversion steps, 64 dummy samples, warm starts, no fallback; its oracle
  errors are logged for analysis only); "all fast" is the same federation
  with every device fast (no staleness);
- buffered asynchronous (FedBuff: 10 clients in flight, buffer 5, twice the
  rounds so both modes apply the same number of updates): FedBuff's
  1/sqrt(1 + tau) weighting, unweighted, and staleness inversion of the updates
  at least 5 versions old (then FedBuff's weighting), at `--async-delays`;
  "all fast" is FedBuff with every device fast;
- the ways back from inversion to the stale update, at `--fallback-delays` (40): the
  oracle-free `residual` test, and the paper's late switch at a fixed round
  (`--switch-round`, half the rounds by default).

Accuracies are on the server's test split: overall, and of class 5 (the slow
class), as the mean of the last 20 rounds and as the mean over the whole run.

    python scripts/compare_staleness.py                     # the full grid
    python scripts/compare_staleness.py --seeds 0 --rounds 20 --delays 10 --datasets digits
    python scripts/compare_staleness.py --delays 40 --modes sync --set strategy.startup=initial \
        --out docs/results/staleness-initial    # the sync part under the other start-up rule
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from fedsim.comparison import (
    Grid,
    add_grid_arguments,
    markdown_table,
    mean_last,
    provenance,
    read_rows,
    run_missing,
)
from fedsim.report import mean_std

SYNC = {
    "direct": ["strategy=stale"],
    "2^(-τ/20)": ["strategy=stale", "strategy.weighting=exponential"],
    "(1+τ)^-½": ["strategy=stale", "strategy.weighting=polynomial"],
    "DC-ASGD": ["strategy=dc_asgd"],
    "inversion": ["strategy=staleness_inversion", "strategy.oracle_metrics=true"],
}
ASYNC = {
    "FedBuff": ["strategy=fedbuff"],
    "async direct": ["strategy=fedbuff", "strategy.weighting=constant"],
    "async inversion": ["strategy=staleness_inversion", "strategy.mode=async",
                        "strategy.weighting=polynomial", "strategy.min_staleness=5",
                        "strategy.oracle_metrics=true"],
}
RESIDUAL = "inversion, residual fallback"


def fallback_methods(switch_round: int) -> dict[str, list[str]]:
    """The two ways back to the stale update: the residual test and a fixed round."""
    return {
        RESIDUAL: ["strategy=staleness_inversion", "strategy.fallback=residual",
                   "strategy.oracle_metrics=true"],
        f"inversion until round {switch_round}": [
            "strategy=staleness_inversion", "strategy.fallback=round",
            f"strategy.switch_round={switch_round}", "strategy.oracle_metrics=true"],
    }


NO_STALENESS = "all fast"
BASELINE_OF = {"sync": "sync baseline", "async": "async baseline", "fallback": "sync baseline"}
DATASETS = ("digits", "mnist1d")
SLOW = "server/accuracy-class-5"
LAST = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--delays", nargs="+", type=int, default=[10, 20, 40])
    parser.add_argument("--async-delays", nargs="+", type=int, default=[20])
    parser.add_argument("--modes", nargs="+", default=list(BASELINE_OF), choices=list(BASELINE_OF),
                        help="the parts to run and report (sync is always run: the others "
                             "compare with it)")
    parser.add_argument("--fallback-delays", nargs="+", type=int, default=[40],
                        help="delays at which the two fallbacks to the stale update also run")
    parser.add_argument("--switch-round", type=int, default=None,
                        help="last round of inversion with fallback=round (default: half the "
                             "rounds)")
    add_grid_arguments(parser, "staleness", rounds=300)
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="only run the missing cells")
    return parser.parse_args(argv)


def build_grids(args: argparse.Namespace) -> dict[str, Grid]:
    """Sync and async grids, and their all-fast baselines (delay 0)."""
    datasets = {d: [f"dataset={d}"] for d in args.datasets}

    def grid(methods: dict[str, list[str]], delays: list[int], rounds: int, sub: str) -> Grid:
        return Grid(methods=methods, datasets=datasets, value_key="devices.delay",
                    values=delays, seeds=args.seeds, runs_dir=args.runs_dir / sub,
                    base=["+experiment=staleness", f"num_rounds={rounds}", "progress=false",
                          *args.set])

    rounds, async_rounds = args.rounds, 2 * args.rounds
    grids = {
        "sync": grid(SYNC, args.delays, rounds, "sync"),
        "sync baseline": grid({NO_STALENESS: ["strategy=stale"]}, [0], rounds, "sync"),
    }
    if "async" in args.modes:
        grids["async"] = grid(ASYNC, args.async_delays, async_rounds, "async")
        grids["async baseline"] = grid({NO_STALENESS: ["strategy=fedbuff"]}, [0], async_rounds,
                                       "async")
    if "fallback" in args.modes:
        grids["fallback"] = grid(fallback_methods(switch_round(args)), args.fallback_delays,
                                 rounds, "sync")
    return grids


def switch_round(args: argparse.Namespace) -> int:
    """The fixed switch round: `--switch-round`, else half the rounds."""
    return args.switch_round if args.switch_round is not None else args.rounds // 2


def run_mean(rows: list[dict[str, Any]], key: str) -> float:
    """Mean of `key` over every round that reports it (round 0 excluded)."""
    values = [float(r[key]) for r in rows if r.get(key) is not None and r["round"] >= 1]
    return statistics.fmean(values) if values else math.nan


MEASURES = {
    "overall": lambda rows, n: mean_last(rows, "server/accuracy", LAST, n),
    "slow class": lambda rows, n: mean_last(rows, SLOW, LAST, n),
    "slow class, whole run": lambda rows, n: run_mean(rows, SLOW),
    "conversion s": lambda rows, n: run_mean(rows, "train/conversion-seconds-mean"),
    "oracle error stale": lambda rows, n: run_mean(rows, "train/oracle-error-stale-mean"),
    "oracle error inverted": lambda rows, n: run_mean(rows, "train/oracle-error-inverted-mean"),
    "converted": lambda rows, n: run_mean(rows, "train/converted-mean"),
}


def measure(grids: dict[str, Grid], args: argparse.Namespace) -> dict[str, dict]:
    """mode -> measure -> (dataset, delay, method) -> (mean, std, seeds), and under
    "<measure>, per seed" each seed's value in --seeds order; the all-fast baseline is
    repeated on every delay row."""
    out: dict[str, dict] = {}
    for mode, baseline_name in BASELINE_OF.items():
        if mode not in grids:
            continue
        grid, baseline = grids[mode], grids[baseline_name]
        rounds = 2 * args.rounds if mode == "async" else args.rounds
        out[mode] = {}
        for name, fn in MEASURES.items():
            values: dict[tuple[str, float, str], list[float]] = {}
            for cell in grid.cells():
                values.setdefault((cell.dataset, cell.value, cell.method), []).append(
                    fn(read_rows(cell.run_dir), rounds))
            for cell in baseline.cells():
                for delay in grid.values:
                    values.setdefault((cell.dataset, delay, NO_STALENESS), []).append(
                        fn(read_rows(cell.run_dir), rounds))
            out[mode][name] = {key: (*mean_std(v), len(v)) if all(map(math.isfinite, v))
                               else (math.nan, math.nan, len(v)) for key, v in values.items()}
            out[mode][f"{name}, per seed"] = values
    if "fallback" not in grids:
        return out
    out["fallback"] = {name: {**{key: value for key, value in out["sync"][name].items()
                                 if key[1] in grids["fallback"].values
                                 and key[2] in ("direct", "inversion")},
                              **by_key}
                       for name, by_key in out["fallback"].items()}
    return out


def curves(grid: Grid, baseline: Grid, key: str) -> dict[tuple[str, float, str], list[float]]:
    """(dataset, delay, method) -> `key` per round, averaged over seeds."""
    series: dict[tuple[str, float, str], list[list[float]]] = {}
    for cell in grid.cells():
        series.setdefault((cell.dataset, cell.value, cell.method), []).append(
            [r[key] for r in read_rows(cell.run_dir)[1:] if key in r])
    for cell in baseline.cells():
        for delay in grid.values:
            series.setdefault((cell.dataset, delay, NO_STALENESS), []).append(
                [r[key] for r in read_rows(cell.run_dir)[1:] if key in r])
    return {k: [statistics.fmean(v) for v in zip(*runs, strict=True)] for k, runs in series.items()}


def smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing moving average (evaluation on ~36 test samples of a class is noisy)."""
    return [statistics.fmean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]


def plot(grids: dict[str, Grid], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = grids["sync"]
    rows = [(d, key) for d in grid.datasets for key in ("server/accuracy", SLOW)]
    fig, axes = plt.subplots(len(rows), len(grid.values),
                             figsize=(4.2 * len(grid.values), 3.0 * len(rows)), squeeze=False)
    series = {key: curves(grid, grids["sync baseline"], key) for key in ("server/accuracy", SLOW)}
    for i, (dataset, key) in enumerate(rows):
        for j, delay in enumerate(grid.values):
            ax = axes[i][j]
            for method in [NO_STALENESS, *SYNC]:
                ys = smooth(series[key][(dataset, delay, method)])
                ax.plot(range(1, len(ys) + 1), ys, label=method,
                        lw=2.0 if method in ("inversion", NO_STALENESS) else 1.0)
            label = "overall" if key == "server/accuracy" else "class 5 (slow)"
            ax.set(title=f"{dataset}, delay {delay:g}: {label}", xlabel="round",
                   ylabel="accuracy (10-round mean)", ylim=(0, 1))
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def table(stats: dict, methods: list[str], scale: float = 100.0, precision: int = 1) -> str:
    """Accuracies in % with the best in bold; seconds and error ratios (precision 2) plain."""
    text = markdown_table(stats, methods, "delay", scale, precision, bold_best=precision == 1)
    return text.replace("nan ± nan", "n/a")


#: conversion table column -> measure
CONVERSION = {"seconds per conversion": "conversion s",
              "error of the stale update": "oracle error stale",
              "error of the inverted update": "oracle error inverted"}


def conversion_stats(stats: dict, method: str) -> dict:
    """(dataset, delay, column) -> the inversion method's cost and oracle errors."""
    return {(d, v, column): value for column, name in CONVERSION.items()
            for (d, v, m), value in stats[name].items() if m == method}


SECTIONS = {
    "slow class": f"Slow-class accuracy (mean of the last {LAST} rounds, %)",
    "slow class, whole run": "Slow-class accuracy over the whole run (%)",
    "overall": f"Overall accuracy (mean of the last {LAST} rounds, %)",
}


def conversion_note(method: str) -> str:
    """What the conversion table of `method`'s runs shows."""
    return (f"{method[0].upper()}{method[1:]}: seconds per conversion (inversion and re-runs, "
            "1 thread), and the L1 errors of the stale update and of its inverted conversion, "
            "relative to the true fresh update (the client retrained on the current model; "
            "analysis only, never used by the rule).")


def mode_sections(stats: dict, methods: list[str], inversion: str) -> list[str]:
    """The accuracy tables of one mode, then its inversion's cost and errors."""
    lines = []
    for measure, caption in SECTIONS.items():
        lines += [f"{caption}:", "", table(stats[measure], methods), ""]
    return [*lines, conversion_note(inversion), "",
            table(conversion_stats(stats, inversion), list(CONVERSION), 1.0, 2), ""]


def listed(values: list) -> str:
    """`[10, 20]` -> "10, 20"."""
    return ", ".join(map(str, values))


def seeds_text(seeds: list[int]) -> str:
    """`[0]` -> "seed 0", `[0, 1]` -> "seeds 0, 1"."""
    return f"seed{'s' if len(seeds) > 1 else ''} {listed(seeds)}"


def scope_line(args: argparse.Namespace) -> str:
    """What this page ran: datasets, each mode's delays, seeds and rounds."""
    delays = {"sync": args.delays, "async": args.async_delays, "fallback": args.fallback_delays}
    modes = "; ".join(f"{mode} at delay {listed(delays[mode])}"
                      for mode in delays if mode == "sync" or mode in args.modes)
    return (f"This page: {listed(args.datasets)}; {modes}; {seeds_text(args.seeds)}; "
            f"{args.rounds} sync rounds.")


def write_report(args: argparse.Namespace, grids: dict[str, Grid]) -> None:
    stats = measure(grids, args)
    sync_methods, async_methods = [NO_STALENESS, *SYNC], [NO_STALENESS, *ASYNC]
    cells = [c for g in grids.values() for c in g.cells()]
    lines = [
        "# Stale updates under intertwined data and device heterogeneity",
        "",
        provenance("scripts/compare_staleness.py", cells, args.workers),
        "",
        __doc__.split("\n\n", 1)[1].split("    python")[0].strip(),
        "",
        scope_line(args),
        "",
        f"![curves]({args.out.with_suffix('.png').name})  \n*Sync mode, mean over "
        f"{seeds_text(args.seeds)}, 10-round moving average.*",
        "",
        f"## Synchronous rounds ({args.rounds} rounds)",
        "",
        *mode_sections(stats["sync"], sync_methods, "inversion"),
    ]
    if "async" in stats:
        lines += [
            f"## Buffered asynchronous (FedBuff clock, {2 * args.rounds} server rounds)",
            "",
            *mode_sections(stats["async"], async_methods, "async inversion"),
        ]
    if "fallback" in stats:
        fallbacks = fallback_methods(switch_round(args))
        lines += [
            "## Oracle-free fallback to the stale update",
            "",
            "`strategy.fallback=residual` keeps the inverted update only while the drift it "
            "measures on the estimate exceeds the estimate's misfit; `strategy.fallback=round` "
            f"inverts until round {switch_round(args)} and aggregates the stale update "
            "directly after it (the paper's late switch, at a fixed round instead of the "
            "reference's oracle). The share of stale updates each converted:",
            "",
            table(stats["fallback"]["converted"], list(fallbacks), 100.0, 0),
            "",
            *mode_sections(stats["fallback"], [NO_STALENESS, "direct", "inversion", *fallbacks],
                           RESIDUAL),
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines))
    plot(grids, args.out.with_suffix(".png"))
    serializable = {mode: {name: {" | ".join(map(str, k)): v for k, v in table_.items()}
                           for name, table_ in by_measure.items()}
                    for mode, by_measure in stats.items()}
    args.out.with_suffix(".json").write_text(json.dumps(serializable, indent=1))
    print(f"wrote {args.out.with_suffix('.md')}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    grids = build_grids(args)
    cells = [cell for grid in grids.values() for cell in grid.cells()]
    cells.sort(key=lambda c: "inversion" not in c.method)  # the long runs first
    run_missing(cells, args.workers)
    if args.report:
        write_report(args, grids)


if __name__ == "__main__":
    main()
