"""FRL vs FedAvg, trimmed mean, Multi-Krum under poisoning; writes docs/results/frl.{md,png,json}.

Every method runs the `frl_mnist1d` preset (50 clients, 10 a round, Dirichlet
alpha 1.0) at 0, 10 and 20% malicious clients, each against the attack the FRL
paper pairs it with: rank reversal on FRL, 100000x scaling on FedAvg, the
NDSS-21 aggregation-tailored attack on trimmed mean and Multi-Krum.

    python scripts/compare_frl.py                           # the full grid
    python scripts/compare_frl.py --seeds 0 --rounds 5 --fractions 0 0.2   # a smoke run
    python scripts/compare_frl.py --rounds 200 --datasets mnist1d --methods FRL "FRL topk" \
        FedAvg "Trimmed mean" Multi-Krum --fractions 0 --lrs 0.01 0.1 0.4 --seeds 0 1 \
        --set model.channels=100 --workers 2 --out docs/results/frl-wide
        # a 4x wider 1-D CNN, each method at 3 client lrs

With `--lrs` the grid sweeps the client learning rate (every method's `client.lr`, the
base of its 0.999-a-round decay) at one malicious fraction instead of the fraction, and the
page reports each method's best lr on that shared grid. `--method-lrs` then runs the
attacked grid with each method at its own lr (the best of such a sweep):

    python scripts/compare_frl.py --rounds 200 --datasets mnist1d --seeds 0 1 \
        --set model.channels=100 --method-lrs FRL=0.1 "FRL topk=0.4" FedAvg=0.1 \
        "Trimmed mean=0.1" Multi-Krum=0.1 --workers 2 --out docs/results/frl-wide-attacked

Runs land in --runs-dir (default outputs/compare_frl); finished runs are reused,
so an interrupted comparison resumes where it stopped. A model an attack destroys
(`model_destroyed_round` in the run's summary) is a result: the run goes on to its
last round, and the report lists such runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import Counter
from collections.abc import Callable

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
from fedsim.datasets.federated import build_federated_data
from fedsim.runtime import initial_model

#: The FRL reference's local SGD for its FedAvg-style baselines (MNIST): lr 0.01 decayed by
#: 0.999 a round, momentum 0.9, weight decay 1e-4, cosine over 2 epochs, batch 8.
BASELINE_CLIENT = ["client=sgd", "client.lr=0.01", "client.lr_decay=0.999",
                   "client.cosine_epochs=true", "client.momentum=0.9",
                   "client.weight_decay=0.0001", "client.local_epochs=2", "client.batch_size=8"]
METHODS = {
    "FRL": ["strategy=frl", "client=frl", "attack=rank_reversal"],
    "FRL topk": ["strategy=frl", "strategy.mask_mode=topk", "client=frl",
                 "attack=rank_reversal"],
    "FedAvg": ["strategy=fedavg", *BASELINE_CLIENT, "attack=scaling"],
    "Trimmed mean": ["strategy=fedtrimmedavg", "strategy.beta=0.2", *BASELINE_CLIENT,
                     "attack=tailored"],
    "Multi-Krum": ["strategy=multikrum", "strategy.num_malicious_nodes=2",
                   "strategy.num_nodes_to_select=5", *BASELINE_CLIENT, "attack=tailored"],
}
ATTACKS = {"FRL": "rank reversal", "FRL topk": "rank reversal", "FedAvg": "scaling x100000",
           "Trimmed mean": "aggregation-tailored (NDSS-21)",
           "Multi-Krum": "aggregation-tailored (NDSS-21)"}
DATASETS = {"mnist1d": ["dataset=mnist1d"], "digits": ["dataset=digits"]}
MODELS = {  # dense model for the baselines, its supermask twin for FRL
    "mnist1d": ("cnn1d", "supermask_cnn1d"),
    "digits": ("mlp", "supermask_mlp"),
}
ACCURACY = "server/accuracy"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="a subset to run (the report needs FRL and FedAvg)")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.0, 0.1, 0.2])
    parser.add_argument("--lrs", nargs="+", type=float, default=None,
                        help="sweep every method's client lr on this grid instead of the "
                             "malicious fraction (needs exactly one --fractions value)")
    parser.add_argument("--method-lrs", nargs="+", default=[], metavar="METHOD=LR",
                        help="a client lr for each named method, in place of its "
                             "reference lr (e.g. each method's best lr of a --lrs sweep)")
    add_grid_arguments(parser, "frl", rounds=300)
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="only run the missing cells (e.g. on a bigger machine)")
    args = parser.parse_args(argv)
    if args.lrs and args.method_lrs:
        parser.error("--method-lrs sets one lr per method; --lrs sweeps a grid of them: "
                     "use one of the two")
    if args.lrs and len(args.fractions) != 1:
        parser.error(f"--lrs sweeps the lr at one malicious fraction; got --fractions "
                     f"{' '.join(map(str, args.fractions))}")
    if (args.lrs or args.method_lrs) and any(s.startswith("client.lr=") for s in args.set):
        parser.error("--set client.lr=... sets every method's lr, which --lrs and "
                     "--method-lrs override: use --lrs (a grid) or --method-lrs METHOD=LR "
                     "(one lr per method) without it")
    try:
        args.method_lrs = method_lrs(args.method_lrs, args.methods)
    except ValueError as err:
        parser.error(str(err))
    return args


def method_lrs(items: list[str], methods: list[str]) -> dict[str, float]:
    """`METHOD=LR` items as {method: lr}; each method one of `methods`, each lr above 0."""
    lrs = {}
    for item in items:
        method, sep, value = item.rpartition("=")
        if not sep:
            raise ValueError(f"--method-lrs: {item!r} is not METHOD=LR")
        if method not in methods:
            raise ValueError(f"--method-lrs: {method!r} is not one of --methods "
                             f"({', '.join(map(repr, methods))})")
        try:
            lr = float(value)
        except ValueError:
            lr = math.nan
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"--method-lrs: {method}'s lr must be a number above 0, got "
                             f"{value!r}")
        if method in lrs:
            raise ValueError(f"--method-lrs: {method} is given twice")
        lrs[method] = lr
    return lrs


def lr_sentence(lrs: dict[str, float], methods: list[str]) -> str:
    """The page's note of per-method lrs, which replace the reference lrs it states."""
    if not lrs:
        return ""
    named = ", ".join(f"{method} {lrs[method]}" for method in methods if method in lrs)
    kept = [method for method in methods if method not in lrs]
    verb = "keeps" if len(kept) == 1 else "keep"
    rest = f"; {', '.join(kept)} {verb} the reference's" if kept else ""
    return (f" Here the client lrs are set per method (`--method-lrs`; each the base of "
            f"the 0.999-a-round decay): {named}{rest}.")


def lr_tag(lrs: dict[str, float]) -> list[str]:
    """The run-folder tag of per-method lrs (empty without them)."""
    return [f"lr-{method}-{lr}" for method, lr in sorted(lrs.items())]


def build_grid(args: argparse.Namespace) -> Grid:
    """methods x datasets x (malicious fractions, or client lrs with `--lrs`) x seeds."""
    pairs = {}
    for dataset in args.datasets:
        dense, supermask = MODELS[dataset]
        for method in args.methods:
            model = supermask if method.startswith("FRL") else dense
            pairs[(method, dataset)] = [f"model={model}"]
            if method in args.method_lrs:
                pairs[(method, dataset)].append(f"client.lr={args.method_lrs[method]}")
    value_key, values, fixed = "attack.fraction", args.fractions, []
    if args.lrs:
        value_key, values = "client.lr", args.lrs
        fixed = [f"attack.fraction={args.fractions[0]}"]
    tag = [f"rounds{args.rounds}", *args.set, *fixed, *(["lrs"] if args.lrs else []),
           *lr_tag(args.method_lrs)]
    return Grid(
        # --set after each method's own client (as compare_baselines does), so it wins
        methods={name: [*METHODS[name], *args.set] for name in args.methods},
        datasets={name: DATASETS[name] for name in args.datasets},
        value_key=value_key,
        values=values,
        seeds=args.seeds,
        base=["+experiment=frl_mnist1d", f"num_rounds={args.rounds}", "progress=false",
              *fixed],
        runs_dir=args.runs_dir / slug("_".join(tag)),
        pairs=pairs,
    )


def drops(stats: dict, methods: list[str]) -> list[str]:
    """Per dataset and attacked fraction: each method's accuracy change from no attack."""
    lines = []
    for dataset, value in dict.fromkeys((d, v) for d, v, _ in stats):
        if value == 0 or (dataset, 0.0, methods[0]) not in stats:
            continue
        parts = [f"{m} {100 * (stats[(dataset, value, m)][0] - stats[(dataset, 0.0, m)][0]):+.1f}"
                 for m in methods]
        lines.append(f"- {dataset}, {100 * value:g}% malicious: " + ", ".join(parts))
    return lines


def reading(stats: dict, methods: list[str]) -> list[str]:
    """Per dataset: FRL's distance from FedAvg unattacked, and what each method keeps at most."""
    lines = []
    for dataset in dict.fromkeys(d for d, _, _ in stats):
        fractions = sorted(v for d, v, m in stats if d == dataset and m == methods[0])
        if 0.0 not in fractions or len(fractions) < 2:
            continue
        worst = fractions[-1]
        clean = {m: stats[(dataset, 0.0, m)][0] for m in methods}
        frl_gaps = ", ".join(f"{m} {100 * (clean[m] - clean['FedAvg']):+.1f}"
                             for m in methods if m.startswith("FRL"))
        kept = ", ".join(f"{m} {100 * stats[(dataset, worst, m)][0] / clean[m]:.0f}%"
                         for m in methods)
        lines.append(f"- {dataset}: without attack, points from FedAvg: {frl_gaps}. At "
                     f"{100 * worst:g}% malicious, share of its own unattacked accuracy each "
                     f"method keeps: {kept}.")
    return lines


def upload_bytes(cells, method: str, dataset: str) -> float:
    """Mean bytes uploaded per client per round in the unattacked runs (as metered)."""
    per_client = []
    for cell in cells:
        if cell.method == method and cell.dataset == dataset and cell.value == 0:
            cfg = compose(list(cell.overrides))
            per_client += [r["bytes_up"] / cfg.clients_per_round for r in read_rows(cell.run_dir)
                           if r["round"] >= 1]
    return statistics.fmean(per_client) if per_client else math.nan


def model_sizes(grid: Grid, dataset: str) -> dict[str, float]:
    """Bytes of one upload computed from the models: float32, uint rankings, ideal bits."""
    sizes = {}
    for method in ("FedAvg", "FRL"):
        cfg = compose([*grid.base, *grid.datasets[dataset], *grid.methods[method],
                       *grid.pairs[(method, dataset)]])
        state = initial_model(cfg, build_federated_data(cfg)).state_dict()
        numels = [v.numel() for v in state.values()]
        sizes[f"{method} float32"] = 4.0 * sum(numels)
        if method == "FRL":
            sizes["FRL ideal"] = sum(n * math.ceil(math.log2(n)) for n in numels) / 8
    return sizes


def bytes_table(grid: Grid, cells) -> str:
    lines = ["| dataset | FedAvg upload (B) | FRL upload (B) | FRL / FedAvg | FRL ideal "
             "n·ceil(log2 n) bits (B) | FRL scores as float32 (B) |",
             "|---|---:|---:|---:|---:|---:|"]
    for dataset in grid.datasets:
        fedavg, frl = upload_bytes(cells, "FedAvg", dataset), upload_bytes(cells, "FRL", dataset)
        sizes = model_sizes(grid, dataset)
        lines.append(f"| {dataset} | {fedavg:,.0f} | {frl:,.0f} | {frl / fedavg:.2f} | "
                     f"{sizes['FRL ideal']:,.0f} | {sizes['FRL float32']:,.0f} |")
    return "\n".join(lines)


def destroyed_round(cell) -> int | None:
    """The round in which the run's model was found destroyed (None: it never was)."""
    summary = cell.run_dir / "summary.json"
    return json.loads(summary.read_text()).get("model_destroyed_round") \
        if summary.exists() else None


def fraction_label(value: float) -> str:
    return f"{100 * value:g}% malicious"


def lr_label(value: float) -> str:
    return f"client lr {value:g}"


def destroyed(cells, label: Callable[[float], str] = fraction_label) -> list[str]:
    """Per dataset, swept value and method: the seeds whose model was destroyed."""
    runs = Counter((cell.dataset, cell.value, cell.method) for cell in cells)
    found: dict[tuple, list[str]] = {}
    for cell in cells:
        first = destroyed_round(cell)
        if first is not None:
            found.setdefault((cell.dataset, cell.value, cell.method), []).append(
                f"seed {cell.seed} in round {first}")
    return [f"- {dataset}, {label(value)}, {method}: {len(seeds)} of "
            f"{runs[(dataset, value, method)]} runs ({', '.join(seeds)})"
            for (dataset, value, method), seeds in found.items()]


def raw_result(cell, rows: list[dict], rounds: int, swept: str = "fraction") -> dict:
    """One run's identity and results, for the .json file."""
    return {"dataset": cell.dataset, "method": cell.method, swept: cell.value,
            "seed": cell.seed, "overrides": list(cell.overrides[:-1]),
            f"accuracy_round{rounds}": metric_at(rows, ACCURACY, rounds),
            "accuracy_last3_evals": mean_last(rows, ACCURACY, 3, rounds),
            "model_destroyed_round": destroyed_round(cell)}


def accuracies(args: argparse.Namespace, grid: Grid, x_label: str, log_x: bool) -> tuple:
    """Final and last-3-evaluation accuracy stats of the grid; plots the final one."""
    cells = grid.cells()
    final = summarize(cells, lambda rows: metric_at(rows, ACCURACY, args.rounds))
    smooth = summarize(cells, lambda rows: mean_last(rows, ACCURACY, 3, args.rounds))
    plot_methods(final, list(grid.methods), x_label, f"server accuracy, round {args.rounds}",
                 args.out.with_suffix(".png"), log_x=log_x)
    return final, smooth


def write_report(args: argparse.Namespace, grid: Grid) -> None:
    cells = grid.cells()
    methods = list(grid.methods)
    final, smooth = accuracies(args, grid, "malicious fraction", log_x=False)
    cfg = compose([*grid.base, *grid.methods["FRL"]])
    attack_lines = "\n".join(f"- {m}: {a}" for m, a in ATTACKS.items())
    text = f"""# FRL vs FedAvg, trimmed mean and Multi-Krum under poisoning

{provenance("scripts/compare_frl.py", cells, args.workers)} Every number is a
mean ± sample std over seeds {", ".join(map(str, args.seeds))} of the server's centralized
test accuracy (%).

Setup: the `frl_mnist1d` preset{f" with `{' '.join(args.set)}`" if args.set else ""}:
{cfg.num_clients} clients, {cfg.clients_per_round} sampled a round (cohorts with half or more
malicious clients are redrawn), Dirichlet alpha {cfg.partition.alpha}, {args.rounds} rounds.
Malicious clients are the lowest ids (`attack.fraction` x {cfg.num_clients}); in an attacked
round up to {cfg.attack.colluders} malicious clients train honestly and pool their results
(the reference's partial-knowledge threat model). Attacks:
{attack_lines}

FRL trains the scores of a supermask network (MNIST-1D: the 1-D CNN, digits: the MLP;
frozen signed-constant weights, 50% of edges kept, mask mode `{cfg.strategy.mask_mode}`)
with the reference's client (lr 0.4 x 0.999^round, momentum 0.9, wd 1e-4, cosine over 2
epochs, batch 8). The baselines train the same architectures as ordinary dense networks
with the reference's baseline client (lr 0.01 x 0.999^round, otherwise the same).\
{lr_sentence(args.method_lrs, methods)}
Trimmed mean cuts 20% at each end; Multi-Krum assumes 2 malicious nodes and averages the 5
best-scored updates.

## Accuracy after {args.rounds} rounds

{markdown_table(final, methods, "malicious")}

![accuracy vs malicious fraction]({args.out.with_suffix(".png").name})

## Mean of the last 3 evaluations (every 5 rounds)

{markdown_table(smooth, methods, "malicious")}

## Destroyed models

A run whose global model an attack destroyed (its arrays not finite, or every client's
reply NaN or inf after an update with a malicious upload) goes on to its last round
at the accuracy that model really has; its rounds without a usable reply do not stop
it (`model_destroyed` in metrics.jsonl, `model_destroyed_round` in summary.json):

{chr(10).join(destroyed(cells)) or "(no run's model was destroyed)"}

## Change from each method's own unattacked accuracy (points)

{chr(10).join(drops(final, methods)) or "(this grid has no attacked fraction)"}

## Reading

{chr(10).join(reading(final, methods)) or "(this grid has no attacked fraction)"}

Caveats that limit what the table says:
- Multi-Krum is told to expect 2 malicious nodes in every round, also at 0% (the
  reference tells it the round's true count); trimmed mean always cuts 20% per side.
- The tailored attack estimates the benign statistics from the colluders' own honest
  updates (partial knowledge, as in the reference), not from the benign clients'.
- The scale is small: {args.rounds} rounds of {cfg.clients_per_round} clients, against the
  reference's 2000 rounds of 25 clients out of 1000 on MNIST/CIFAR-10 with LeNet/Conv8.

## Upload per client per round

Metered on the wire (array payload of the reply messages, unattacked runs): FRL sends one
ranking per layer as the narrowest unsigned integer type that holds an edge id (uint16
here), FedAvg sends float32 weights and biases. The ideal column is the paper's
n·ceil(log2 n) bits per layer, which fedsim does not bit-pack.

{bytes_table(grid, cells)}
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    raw = [raw_result(c, read_rows(c.run_dir), args.rounds) for c in cells]
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")


def best_lrs(stats: dict, methods: list[str]) -> list[str]:
    """Per dataset: each method's best client lr on the grid, and its accuracy there."""
    lines = []
    for dataset in dict.fromkeys(d for d, _, _ in stats):
        parts = []
        for method in methods:
            lr, (mean, std, _) = max(((v, s) for (d, v, m), s in stats.items()
                                      if d == dataset and m == method), key=lambda x: x[1][0])
            parts.append(f"{method} at lr {lr:g} ({100 * mean:.1f} ± {100 * std:.1f})")
        lines.append(f"- {dataset}: " + ", ".join(parts))
    return lines


def mask_gaps(stats: dict) -> list[str]:
    """Per dataset and lr: the `topk` mask's accuracy minus the reference |score| mask's."""
    return [f"- {d}, lr {v:g}: {100 * (stats[(d, v, 'FRL topk')][0] - mean):+.1f} points "
            f"({100 * stats[(d, v, 'FRL topk')][0]:.1f} against {100 * mean:.1f})"
            for (d, v, m), (mean, _, _) in stats.items()
            if m == "FRL" and (d, v, "FRL topk") in stats]


def write_lr_report(args: argparse.Namespace, grid: Grid) -> None:
    """The `--lrs` page: every method on the same client-lr grid at one malicious fraction."""
    cells = grid.cells()
    methods = list(grid.methods)
    final, smooth = accuracies(args, grid, "client lr", log_x=True)
    cfg = compose([*grid.base, *grid.methods[methods[0]]])
    attacks = ("No client is malicious, so no attack runs." if args.fractions[0] == 0 else
               "Attacks: " + "; ".join(f"{m}, {ATTACKS[m]}" for m in methods) + ".")
    lrs = ", ".join(f"{lr:g}" for lr in args.lrs)
    text = f"""# FRL vs its baselines: the client learning rate

{provenance("scripts/compare_frl.py", cells, args.workers)} Every number is a
mean ± sample std over seeds {", ".join(map(str, args.seeds))} of the server's centralized
test accuracy (%).

Setup: the `frl_mnist1d` preset{f" with `{' '.join(args.set)}`" if args.set else ""}:
{cfg.num_clients} clients, {cfg.clients_per_round} sampled a round, Dirichlet alpha
{cfg.partition.alpha}, {args.rounds} rounds, {fraction_label(args.fractions[0])}.
{attacks} Every method runs at each client lr of the same grid
({lrs}); the lr is the base of the 0.999-a-round decay, and the rest of each client is the
reference's: FRL's (momentum 0.9, wd 1e-4, cosine over 2 epochs, batch 8; the reference
uses lr 0.4) for the supermask runs, the reference's baseline client (the same, at lr 0.01)
for the dense ones. FRL masks keep 50% of edges; `FRL` is the reference's |score| mask,
`FRL topk` the paper's top-k mask.

## Accuracy after {args.rounds} rounds

{markdown_table(final, methods, "client lr")}

![accuracy vs client lr]({args.out.with_suffix(".png").name})

## Mean of the last 3 evaluations (every 5 rounds)

{markdown_table(smooth, methods, "client lr")}

## Best lr on this grid (accuracy after {args.rounds} rounds)

{chr(10).join(best_lrs(final, methods))}

## `topk` mask minus the reference mask, per lr (after {args.rounds} rounds)

{chr(10).join(mask_gaps(final)) or "(this grid does not run both masks)"}

## Destroyed models

{chr(10).join(destroyed(cells, lr_label)) or "(no run's model was destroyed)"}
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    raw = [raw_result(c, read_rows(c.run_dir), args.rounds, "lr") for c in cells]
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    grid = build_grid(args)
    run_missing(grid.cells(), args.workers)
    label = lr_label if args.lrs else fraction_label
    for line in destroyed(grid.cells(), label):
        print(f"model destroyed {line[2:]}")
    if args.report:
        (write_lr_report if args.lrs else write_report)(args, grid)
        print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
