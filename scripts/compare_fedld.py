"""FedLD vs FedAvg vs FedProx across label skew; writes docs/results/fedld.{md,png,json}.

Every method runs the `fedld_mnist1d` preset (10 clients, all of them every round,
1 local epoch of SGD lr 0.05, momentum 0.9, weight decay 5e-4, batch 50) with
only its strategy and client swapped, on the same partitions and seeds:

    python scripts/compare_fedld.py                     # the full grid (about 25 min, 2 cores)
    python scripts/compare_fedld.py --seeds 0 --alphas 0.1 --rounds 5   # a smoke run
    python scripts/compare_fedld.py --alphas 0.1 0.5 --workers 1 --out docs/results/fedld-direction
    python scripts/compare_fedld.py --set client.lr=0.01 client.momentum=0.5 \
        --out docs/results/fedld-reference-local      # the reference's local settings

Runs land in --runs-dir (default outputs/compare_fedld); finished runs are
reused, so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics

from fedsim.comparison import (
    Grid,
    add_grid_arguments,
    markdown_table,
    mean_last,
    metric_at,
    plot_methods,
    provenance,
    read_rows,
    run_missing,
    slug,
    summarize,
)
from fedsim.config import compose

METHODS = {
    "FedLD": ["strategy=fedld", "client=fedld"],
    "FedAvg": ["strategy=fedavg", "client=sgd"],
    "FedProx": ["strategy=fedprox", "client=sgd"],
}
ABLATIONS = {  # which half of FedLD costs or gains accuracy
    "FedLD server rule only (lam 0)": ["strategy=fedld", "client=fedld", "client.lam=0"],
    "FedLD client only (mean agg.)": ["strategy=fedld", "client=fedld",
                                      "strategy.principal_gradient=false"],
    "FedLD at the mean's length": ["strategy=fedld", "client=fedld",
                                   "strategy.match_mean_norm=true"],
}
SERVER_ONLY, CLIENT_ONLY, MEAN_LENGTH = ABLATIONS
DATASETS = {
    "mnist1d": ["dataset=mnist1d", "model=cnn1d"],
    "digits": ["dataset=digits", "model=mlp"],
}
ACCURACY = "server/accuracy"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.05, 0.1, 0.5, 1.0, 100.0])
    add_grid_arguments(parser, "fedld", rounds=100)
    parser.add_argument("--early", type=int, default=50, help="also report accuracy here")
    parser.add_argument("--no-ablations", dest="ablations", action="store_false",
                        help="skip the two FedLD halves run on their own")
    args = parser.parse_args(argv)
    if not 1 <= args.early <= args.rounds:
        parser.error(f"--early must be in [1, --rounds={args.rounds}] (got {args.early})")
    return args


def build_grid(args: argparse.Namespace) -> Grid:
    return Grid(
        methods={**METHODS, **(ABLATIONS if args.ablations else {})},
        datasets={name: DATASETS[name] for name in args.datasets},
        value_key="partition.alpha",
        values=args.alphas,
        seeds=args.seeds,
        base=["+experiment=fedld_mnist1d", f"num_rounds={args.rounds}", "progress=false",
              *args.set],
        runs_dir=args.runs_dir / slug("_".join([f"rounds{args.rounds}", *args.set])),
    )


def update_ratio(rows: list[dict]) -> float:
    """Mean over rounds >= 2 of |FedLD update| / |mean of the deltas|."""
    ratios = [r["train/update-norm"] / r["train/mean-delta-norm"] for r in rows
              if r["round"] >= 2 and r.get("train/mean-delta-norm")
              and r.get("train/update-norm") is not None]
    return statistics.fmean(ratios) if ratios else float("nan")


def update_cosine(rows: list[dict]) -> float:
    """Mean over rounds >= 2 of the cosine between FedLD's update and the mean delta."""
    cosines = [r["train/update-cosine"] for r in rows
               if r["round"] >= 2 and r.get("train/update-cosine") is not None]
    return statistics.fmean(cosines) if cosines else float("nan")


def verdicts(stats: dict, methods: list[str]) -> list[str]:
    """Per setting: FedLD's mean against the best baseline, and whether the gap is beyond noise."""
    lines = []
    for dataset, value in dict.fromkeys((d, v) for d, v, _ in stats):
        ld_mean, ld_std, _ = stats[(dataset, value, "FedLD")]
        baselines = [m for m in methods if m in METHODS and m != "FedLD"]
        rival = max(baselines, key=lambda m: stats[(dataset, value, m)][0])
        r_mean, r_std, _ = stats[(dataset, value, rival)]
        gap = 100 * (ld_mean - r_mean)
        clear = abs(ld_mean - r_mean) > ld_std + r_std
        word = "wins" if gap > 0 else "loses"
        noise = "larger" if clear else "not larger"
        lines.append(f"- {dataset}, alpha {value:g}: FedLD {word} against {rival} by "
                     f"{abs(gap):.1f} points ({noise} than the two stds added)")
    return lines


def local_settings(grid: Grid) -> str:
    """The shared local training settings, read from the composed config."""
    client = compose([*grid.base, *METHODS["FedAvg"]]).client
    return (f"{client.local_epochs} local epoch(s) of SGD (lr {client.lr}, momentum "
            f"{client.momentum}, weight decay {client.weight_decay}, batch {client.batch_size})")


def ablation_text(stats: dict) -> str:
    """Mean gaps over all settings that say which half of FedLD moves the accuracy, and
    how much of FedLD's gap to FedAvg the mean's step length gives back."""
    settings = list(dict.fromkeys((d, v) for d, v, _ in stats))
    if not all((*settings[0], name) in stats for name in ABLATIONS):
        return ""

    def gap(a: str, b: str) -> float:
        return 100 * statistics.fmean(stats[(*s, a)][0] - stats[(*s, b)][0] for s in settings)

    return (f"\nAblations, averaged over the {len(settings)} settings: `{CLIENT_ONLY}` is "
            f"{gap(CLIENT_ONLY, 'FedAvg'):+.1f} points from FedAvg (the margin loss, with "
            f"FedLD's unweighted mean in place of FedAvg's sample-weighted one), and "
            f"`{SERVER_ONLY}` is {gap(SERVER_ONLY, 'FedLD'):+.1f} points from FedLD (the "
            f"aggregation rule without the margin loss). `{MEAN_LENGTH}` (FedLD's direction, "
            f"averaging's step length) is {gap(MEAN_LENGTH, 'FedLD'):+.1f} points from FedLD, "
            f"of the {gap('FedAvg', 'FedLD'):+.1f} that FedAvg is from FedLD.\n")


def raw_result(cell, rows: list[dict], rounds: tuple[int, ...]) -> dict:
    """One run's identity and its accuracy at the reported rounds, for the .json file."""
    return {"dataset": cell.dataset, "method": cell.method, "alpha": cell.value,
            "seed": cell.seed, "overrides": list(cell.overrides[:-1]),
            **{f"accuracy_round{r}": metric_at(rows, ACCURACY, r) for r in rounds}}


def write_report(args: argparse.Namespace, grid: Grid) -> None:
    cells = grid.cells()
    methods = list(grid.methods)
    final = summarize(cells, lambda rows: metric_at(rows, ACCURACY, args.rounds))
    early = summarize(cells, lambda rows: metric_at(rows, ACCURACY, args.early))
    smooth = summarize(cells, lambda rows: mean_last(rows, ACCURACY, 5, args.rounds))
    ld_cells = [c for c in cells if c.method == "FedLD"]
    ratio = summarize(ld_cells, update_ratio)
    cosine = summarize(ld_cells, update_cosine)
    plot_methods(final, methods, "Dirichlet alpha (log scale)",
                 f"server accuracy, round {args.rounds}", args.out.with_suffix(".png"))

    wins = sum(line.split(": FedLD ")[1].startswith("wins") for line in verdicts(final, methods))
    extra = f" with `{' '.join(args.set)}`" if args.set else ""
    ratio_lines = [f"| {d} | {v:g} | {m:.2f} ± {s:.2f} | {cosine[key][0]:.2f} ± "
                   f"{cosine[key][1]:.2f} |" for key, (m, s, _) in ratio.items()
                   for d, v, _ in [key]]
    text = f"""# FedLD vs FedAvg vs FedProx under label skew

{provenance("scripts/compare_fedld.py", cells, args.workers)} Every number is a
mean ± sample std over seeds {", ".join(map(str, args.seeds))} of the server's centralized
test accuracy (%).

Setup: the `fedld_mnist1d` preset{extra}. 10 clients, all 10 train every round (as in
the paper's setup), Dirichlet label split with the alpha below, {args.rounds} rounds,
{local_settings(grid)}. MNIST-1D uses the
1-D CNN, digits the MLP. Methods differ only in strategy and client: FedLD = margin
loss (lam 0.03) + principal-gradient aggregation (k_proportion 0.8); FedAvg = plain
SGD + sample-weighted mean; FedProx = SGD with mu 0.01 + weighted mean. Same
partitions, initial model and client sampling for all three (one seed drives them).

## Accuracy after {args.rounds} rounds

{markdown_table(final, methods, "alpha")}

![accuracy vs alpha]({args.out.with_suffix(".png").name})

## Accuracy after {args.early} rounds

{markdown_table(early, methods, "alpha")}

## Mean of the last 5 rounds (less sensitive to one round's noise)

{markdown_table(smooth, methods, "alpha")}

## Where FedLD wins and where it does not (after {args.rounds} rounds)

FedLD has the best mean in {wins} of {len(final) // len(methods)} settings.

{chr(10).join(verdicts(final, methods))}

## Why: the length and the direction of FedLD's update

`update-norm / mean-delta-norm` is the length of FedLD's server update divided by that
of the plain mean of the same deltas, and `update-cosine` the cosine between the two
(both logged by every delta strategy), averaged over rounds 2..{args.rounds}:

| dataset | alpha | length ratio | cosine |
|---|---:|---:|---:|
{chr(10).join(ratio_lines)}

Each client's revised update has a component of length
`||d_i|| * s_j / sum(s)` along every kept principal direction, with only the sign
taken from the client. Clients whose update is nearly orthogonal to a direction still
add a full-length component with a sign set by noise, so the update leaves the
mean's direction (the cosine) as well as shrinking (the length ratio). The
`{MEAN_LENGTH}` ablation rescales the update to the mean's length and keeps its
direction, which separates the two.
{ablation_text(final)}
This comparison cannot reproduce the paper's setup (ImageNet-pretrained ResNet-50 on
retinal and COVID-FL images, 200 rounds), so it says nothing about FedLD there; the
`fedld_cifar10` preset is the closest runnable one, given a network and a GPU.
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    raw = [raw_result(c, read_rows(c.run_dir), (args.early, args.rounds)) for c in cells]
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    grid = build_grid(args)
    run_missing(grid.cells(), args.workers)
    write_report(args, grid)
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
