"""FedLoGe vs FedAvg and FedAvg + FT under long tails; writes OUT.{md,png,json} (--out).

Every run is the `fedloge_mnist1d` preset (20 clients, all training and
evaluating every round, or `--participation` of them training, reference local
SGD: lr 0.03, momentum 0.5, batch 8, 5 epochs) on MNIST-1D (1-D CNN) and digits
(MLP), for imbalance factors 0.01 and 0.02 and Dirichlet alpha 0.5 and 1. Three
runs per cell:

- FedLoGe: strategy=fedloge, client=fedloge (generic = GLA-FR realigned head on
  the server's balanced test set, also scored with the raw g_aux and with SSE-C;
  local = each client's realigned local head);
- FedLoGe norm 0.1: the same with the reference's SSE-C norm 0.1 (fedsim: 1.0);
- FedAvg: strategy=fedavg, client=finetune, whose evaluation reports both the
  global model on each client's test split (FedAvg's local accuracy) and a copy
  with the head fine-tuned for 5 epochs on the client's training set (FedAvg + FT).

Accuracies are the mean of the last 5 rounds; local ones are means over the 20
clients, under fedsim's scoring (classes absent from a client's training set ruled
out, for every method) and the reference code's (FedLoGe masked by the test labels,
FedAvg not masked); head / middle / tail are the class groups covering 75% / 95% /
the rest of the long-tailed training set.

    python scripts/compare_fedloge.py                      # the full grid (docs/results/fedloge)
    python scripts/compare_fedloge.py --rounds 100 --workers 2 --datasets mnist1d \
        --out docs/results/fedloge-mnist1d      # the published pages: one per dataset,
    python scripts/compare_fedloge.py --rounds 100 --workers 2 --datasets digits \
        --out docs/results/fedloge-digits       # run separately for time
    python scripts/compare_fedloge.py --seeds 0 --rounds 3 --datasets digits   # a smoke run
    python scripts/compare_fedloge.py --rounds 100 --workers 2 --participation 0.2 \
        --runs-dir outputs/compare_fedloge_20 --out docs/results/fedloge-20pct   # 20% a round
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from fedsim.comparison import (
    Grid,
    add_grid_arguments,
    markdown_table,
    mean_last,
    plot_methods,
    provenance,
    read_rows,
    run_missing,
)
from fedsim.report import mean_std

METHODS = {
    "FedLoGe": ["strategy=fedloge", "client=fedloge"],
    "FedLoGe norm 0.1": ["strategy=fedloge", "client=fedloge", "client.etf_norm=0.1"],
    "FedAvg": ["strategy=fedavg", "client=finetune"],
}
MODELS = {"mnist1d": "cnn1d", "digits": "mlp"}
#: table column -> (run's method, metric); each FedAvg run yields FedAvg and FedAvg + FT.
COLUMNS = {
    "generic": {
        "FedAvg": ("FedAvg", "server/accuracy"),
        "FedLoGe": ("FedLoGe", "server/accuracy"),
        "FedLoGe raw g_aux": ("FedLoGe", "server/raw-aux-accuracy"),
        "FedLoGe SSE-C": ("FedLoGe", "server/sse-c-accuracy"),
        "FedLoGe (SSE-C norm 0.1)": ("FedLoGe norm 0.1", "server/accuracy"),
    },
    "local": {
        "FedAvg": ("FedAvg", "client_eval/mean-global-accuracy"),
        "FedAvg + FT": ("FedAvg", "client_eval/mean-accuracy"),
        "FedLoGe": ("FedLoGe", "client_eval/mean-accuracy"),
        "FedLoGe (SSE-C norm 0.1)": ("FedLoGe norm 0.1", "client_eval/mean-accuracy"),
    },
    "local, reference scoring": {
        "FedAvg": ("FedAvg", "client_eval/mean-reference-global-accuracy"),
        "FedAvg + FT": ("FedAvg", "client_eval/mean-reference-accuracy"),
        "FedLoGe": ("FedLoGe", "client_eval/mean-reference-accuracy"),
        "FedLoGe (SSE-C norm 0.1)": ("FedLoGe norm 0.1", "client_eval/mean-reference-accuracy"),
    },
}
NUM_CLIENTS = 20  # the preset's
GROUPS = ("head", "middle", "tail")
LAST = 5  # rounds averaged at the end of each run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.5, 1.0])
    parser.add_argument("--imbalance", nargs="+", type=float, default=[0.01, 0.02])
    parser.add_argument("--participation", type=float, default=1.0,
                        help="share of the 20 clients that train each round (the reference's "
                             "CIFAR-10/ImageNet-LT runs: 0.2); all of them still evaluate")
    add_grid_arguments(parser, "fedloge", rounds=80)
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="only run the missing cells")
    return parser.parse_args(argv)


def dataset_label(dataset: str, alpha: float) -> str:
    return f"{dataset} α={alpha:g}"


def build_grid(args: argparse.Namespace) -> Grid:
    datasets = {
        dataset_label(d, a): [f"dataset={d}", f"model={MODELS[d]}", f"partition.alpha={a}"]
        for d in args.datasets for a in args.alphas
    }
    return Grid(methods=METHODS, datasets=datasets, value_key="data.imbalance_factor",
                values=args.imbalance, seeds=args.seeds, runs_dir=args.runs_dir,
                base=["+experiment=fedloge_mnist1d", f"num_rounds={args.rounds}", "progress=false",
                      f"clients_per_round={per_round(args)}", *args.set])


def per_round(args: argparse.Namespace) -> int:
    """Clients training each round at `--participation` (at least one)."""
    return max(1, round(args.participation * NUM_CLIENTS))


def measure_cells(grid: Grid, rounds: int) -> dict[tuple[str, float, str], list[float]]:
    """(dataset, IF, "<kind> <column>[ <group>]") -> one value per seed."""
    values: dict[tuple[str, float, str], list[float]] = {}
    for cell in grid.cells():
        rows = [{k: math.nan if v is None else v for k, v in row.items()}  # None: non-finite
                for row in read_rows(cell.run_dir)]
        for kind, columns in COLUMNS.items():
            for column, (method, key) in columns.items():
                if method != cell.method:
                    continue
                for suffix in ("", *(f"-{g}" for g in GROUPS)):
                    name = f"{kind} {column}" + (f" {suffix[1:]}" if suffix else "")
                    values.setdefault((cell.dataset, cell.value, name), []).append(
                        mean_last(rows, key + suffix, LAST, rounds))
    return values


def stats_of(values: dict[tuple[str, float, str], list[float]]) -> dict[Any, tuple]:
    return {key: ((*mean_std(v), len(v)) if all(map(math.isfinite, v))
                  else (math.nan, math.nan, len(v)))
            for key, v in values.items()}


def table(stats: dict, kind: str, group: str = "") -> str:
    columns = [f"{kind} {c}" + (f" {group}" if group else "") for c in COLUMNS[kind]]
    text = markdown_table(stats, columns, "IF").replace("nan ± nan", "n/a")
    header = " | ".join(COLUMNS[kind])
    first, *rest = text.splitlines()
    first = first.split(" | ")[0] + " | IF | " + header + " |"
    return "\n".join([first, *rest])


def gains(stats: dict) -> dict[str, tuple[float, int]]:
    """FedLoGe minus the best baseline in points, averaged over the settings where both
    are measured; with the number of those settings."""
    out = {}
    for kind, columns in COLUMNS.items():
        for group in ("", *GROUPS):
            sfx = f" {group}" if group else ""
            diffs = []
            for dataset, value in {(d, v) for d, v, _ in stats}:
                ours = stats[(dataset, value, f"{kind} FedLoGe{sfx}")][0]
                best = max(stats[(dataset, value, f"{kind} {c}{sfx}")][0]
                           for c in columns if not c.startswith("FedLoGe"))
                if math.isfinite(ours - best):  # n/a: no client had test samples there
                    diffs.append(100 * (ours - best))
            out[f"{kind}{sfx or ' all'}"] = (sum(diffs) / len(diffs), len(diffs))
    return out


def _gain(points: float, measured: int, settings: int) -> str:
    text = f"{points:+.1f}"
    return text if measured == settings else f"{text} ({measured} of {settings})"


def write_report(args: argparse.Namespace, grid: Grid) -> None:
    stats = stats_of(measure_cells(grid, args.rounds))
    missing = [k for k, s in stats.items() if math.isnan(s[0])]
    if missing:
        print(f"warning: {len(missing)} measures are NaN (diverged or missing runs), "
              f"e.g. {missing[:3]}")
    delta = gains(stats)
    settings = len({(d, v) for d, v, _ in stats})
    sections = [
        "# FedLoGe vs FedAvg and FedAvg + FT on long-tailed federated data\n",
        provenance("scripts/compare_fedloge.py", grid.cells(), args.workers) + "\n",
        f"Setup: the `fedloge_mnist1d` preset: 20 clients, {per_round(args)} of them "
        f"training each round and all 20 evaluating, {args.rounds} rounds; long tail "
        "n_c = n_max·IF^(c/9), then Dirichlet(α) over "
        "the clients; reference local SGD (lr 0.03, momentum 0.5, batch 8, 5 epochs) for "
        "every method; SSE-C with `etf_norm` 1.0 (below). MNIST-1D: 1-D CNN, "
        "digits: MLP 64-100-100-10. Accuracy in %, mean ± std over seeds "
        f"{', '.join(map(str, args.seeds))}, each run averaged over its last {LAST} "
        "rounds; the best mean per row in bold.\n",
        "- **generic**: the global model on the balanced test set. FedLoGe is scored "
        "with three heads on its backbone: g_aux realigned by GLA-FR (rows at norm 1.7, "
        "FedLoGe's generic model), the raw g_aux, and SSE-C, the frozen classifier the "
        "backbone trained against (the head the reference code's logs score).",
        "- **local**: mean over the 20 clients of the accuracy on a test split drawn to "
        "follow the client's training mix. FedAvg: the global model as is. FedAvg + FT: "
        "its head fine-tuned 5 epochs on the client's data. FedLoGe: local head + g_aux "
        "by norm transfer. All three rule out the classes absent from the client's "
        "*training* set.",
        "- **local, reference scoring**: the same models scored as the reference code "
        "scores them: FedLoGe with the classes absent from the client's *test* labels "
        "ruled out (the scorer reads the labels it scores), FedAvg and FedAvg + FT with "
        "no class ruled out. The gap between the two local tables is the part of a "
        "gain that comes from scoring.",
        "- **head / middle / tail**: classes covering the first 75% / up to 95% / the "
        "rest of the long-tailed training samples (`class_groups.json` in each run).",
        "- **SSE-C norm**: the reference's class vectors have norm 0.1, chosen for "
        "ResNet with BatchNorm. Against them these small ReLU networks, which have no "
        "normalization, grow their features to norm ~100, and the heads' SGD (lr 0.03) "
        "on those features diverges. fedsim's `client.etf_norm` defaults to 1.0 "
        "(docs/methods/fedloge.md gives the measured run at 0.1).\n",
        "## Generic accuracy\n", table(stats, "generic") + "\n",
        "## Local accuracy\n", table(stats, "local") + "\n",
        "## Local accuracy, reference scoring\n",
        table(stats, "local, reference scoring") + "\n",
    ]
    for group in GROUPS:
        sections += [f"## {group.capitalize()} classes: generic\n",
                     table(stats, "generic", group) + "\n",
                     f"## {group.capitalize()} classes: local\n",
                     table(stats, "local", group) + "\n"]
    sections += [
        f"## FedLoGe (norm 1.0, GLA-FR head) minus the best baseline, averaged over the "
        f"{settings} settings (points)\n",
        "| measure | all | head | middle | tail |", "|---|---:|---:|---:|---:|",
        *(f"| {kind} | " + " | ".join(_gain(*delta[f"{kind} {g}"], settings)
                                       for g in ("all", *GROUPS)) + " |"
          for kind in COLUMNS),
        "",
        "n/a: no client had a test sample of that group in some seed (digits' tail "
        "classes keep 1 to 4 training samples at these imbalance factors, and a client's "
        "test split is half its training size).\n",
        f"![generic and local accuracy]({args.out.with_suffix('.png').name})\n",
    ]
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(sections))
    out.with_suffix(".json").write_text(json.dumps(
        {" | ".join(map(str, k)): v for k, v in stats.items()}, indent=1))
    local_columns = [f"local {c}" for c in COLUMNS["local"]]
    local = {k: v for k, v in stats.items() if k[2] in local_columns}
    plot_methods(local, local_columns, "imbalance factor", "local accuracy",
                 out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.md')}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    grid = build_grid(args)
    run_missing(grid.cells(), args.workers)
    if args.report:
        write_report(args, grid)


if __name__ == "__main__":
    main()
