"""Accuracy against the privacy spent: FedAvg with central and local DP; writes
docs/results/privacy.{md,png,json}.

Every run is FedAvg on the same federation: 50 clients, 10 a round (central DP's
sampling rate q = 0.2), Dirichlet label skew alpha = 0.5, `--rounds` rounds of the
default local SGD (5 epochs, batches of 32, lr 0.05, momentum 0.9), the MLP on both
datasets. Each noise level is one row; epsilon is what the run's accountant reports
after its last round at delta = 1e-5 (RDP, `fedsim.privacy.accounting`).

- central DP (user-level: one client's whole data): each update clipped to norm 1 on
  the server, Gaussian noise of std sigma / 10 on the uniform mean of the 10 updates;
- local DP (sample-level: one training sample): DP-SGD in every client (Opacus), per-sample
  gradients clipped to norm 1, noise std sigma on each Poisson batch's sum; epsilon is
  the largest of any client's (the smallest clients spend the most).

sigma = 0.01 is clipping with next to no noise (no privacy to speak of): against it, the
other levels show what the noise costs, and against no DP, what the clipping costs.

The two epsilons protect different units, so their columns are not comparable with each
other; each is comparable across its own noise levels. Accuracy is the server's model on
its balanced test split, the mean of the last 3 rounds, mean ± std over seeds.

    python scripts/compare_privacy.py                      # the full grid
    python scripts/compare_privacy.py --seeds 0 --rounds 3 --datasets digits \\
        --runs-dir outputs/privacy-smoke --out outputs/privacy-smoke/privacy
"""

from __future__ import annotations

import argparse
import math

from fedsim.comparison import (
    Grid,
    add_grid_arguments,
    markdown_table,
    mean_last,
    metric_at,
    provenance,
    run_and_report,
    summarize,
    write_outputs,
)

CENTRAL = (0.01, 0.1, 0.3, 1.0)
LOCAL = (0.01, 0.5, 1.0, 2.0)
METHODS: dict[str, list[str]] = {
    "no DP": ["privacy=none"],
    **{f"central σ={z:g}": ["privacy=central_fixed", f"privacy.noise_multiplier={z}",
                            "privacy.clipping_norm=1.0"] for z in CENTRAL},
    **{f"local σ={z:g}": ["privacy=local", f"privacy.noise_multiplier={z}",
                          "privacy.max_grad_norm=1.0"] for z in LOCAL},
}
DATASETS = {"mnist1d": ["dataset=mnist1d", "model=mlp"], "digits": ["dataset=digits",
                                                                    "model=mlp"]}
ACCURACY, EPSILON = "server/accuracy", "train/privacy/epsilon"
LAST = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    add_grid_arguments(parser, "privacy", rounds=30)
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="only run the missing cells")
    return parser.parse_args(argv)


def build_grid(args: argparse.Namespace) -> Grid:
    return Grid(
        methods={name: [*METHODS[name], *args.set] for name in args.methods},
        datasets={name: DATASETS[name] for name in args.datasets},
        value_key="num_rounds", values=[args.rounds], seeds=args.seeds,
        runs_dir=args.runs_dir,
        base=["strategy=fedavg", "client=sgd", "partition=dirichlet", "partition.alpha=0.5",
              "num_clients=50", "clients_per_round=10", "evaluation.clients_per_round=0",
              "logger=none", "progress=false"],
    )


def final_epsilon(rows: list[dict]) -> float:
    """The epsilon after the last round (0 for a run without DP)."""
    value = metric_at(rows, EPSILON, rows[-1]["round"])
    return 0.0 if math.isnan(value) else value


def plot(accuracy: dict, epsilon: dict, methods: list[str], out) -> None:
    """Accuracy against epsilon, a panel per dataset, a line per kind of DP, the no-DP
    accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(d for d, _, _ in accuracy))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        value = next(v for d, v, _ in accuracy if d == dataset)
        for kind, marker in (("central", "o"), ("local", "s")):
            names = [m for m in methods if m.startswith(kind)]
            if not names:
                continue
            eps = [epsilon[(dataset, value, m)][0] for m in names]
            acc = [100 * accuracy[(dataset, value, m)][0] for m in names]
            err = [100 * accuracy[(dataset, value, m)][1] for m in names]
            ax.errorbar(eps, acc, yerr=err, marker=marker, capsize=3,
                        label=f"{kind} DP ({'user' if kind == 'central' else 'sample'}-level)")
            for e, a, name in zip(eps, acc, names, strict=True):
                ax.annotate(name.split(" ", 1)[1], (e, a), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        if "no DP" in methods:
            ax.axhline(100 * accuracy[(dataset, value, "no DP")][0], ls="--", color="gray",
                       label="no DP")
        ax.set_xscale("log")
        ax.set(title=dataset, xlabel="epsilon at delta = 1e-5 (log scale)",
               ylabel=f"server accuracy %, last {LAST} rounds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def write_report(args: argparse.Namespace, grid: Grid) -> None:
    cells = grid.cells()
    methods = list(grid.methods)
    accuracy = summarize(cells, lambda rows: mean_last(rows, ACCURACY, LAST, args.rounds))
    epsilon = summarize(cells, final_epsilon)
    plot(accuracy, epsilon, methods, args.out.with_suffix(".png"))
    text = f"""# Accuracy against epsilon: central and local DP

{provenance("scripts/compare_privacy.py", cells, args.workers)}

{__doc__.split(chr(10) + chr(10), 1)[1].split("    python")[0].strip()}

## Server accuracy (%)

{markdown_table(accuracy, methods, 'rounds')}

## Epsilon spent at delta = 1e-5

{markdown_table(epsilon, methods, 'rounds', scale=1.0, precision=2, bold_best=False)}

![accuracy against epsilon]({args.out.with_suffix(".png").name})
"""
    write_outputs(args.out, text, {"accuracy": accuracy, "epsilon": epsilon})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_and_report(args, build_grid(args), write_report)


if __name__ == "__main__":
    main()
