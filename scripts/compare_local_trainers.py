"""Non-federated methods vs backprop, centralized and federated; writes
docs/results/local-trainers.{md,json}.

Each method runs as a fedsim trainer on MNIST-1D:

- centralized: `+experiment=centralized` (one client holding the whole train split,
  FedAvg over one client = identity), `--rounds` rounds of 5 local epochs, for
  every seed; the accuracy is the server's on the test split after the last round;
- federated: 20 clients, Dirichlet alpha 0.5, 10 a round, `--fed-rounds` rounds of
  2 local epochs, seed 0 only;
- paper budgets: a group whose paper trains for more epochs than `--rounds` gives also
  runs centralized for that many epochs (`PAPER_ROUNDS`: NoProp-DT's 100 epochs, 20 rounds);
- memory: the peak bytes autograd holds for backward during one training step on
  a batch of 128 (`fedsim.clients.local_learning.saved_activation_peak`), the
  same trainer code, measured on the CPU (no GPU needed);
- optimizers: AdamW, AdamP and Conda on the ResMLP at every lr of `--lrs`, centralized as
  above, every seed; each is scored at its tuned lr, and speed is the rounds to a fixed
  fraction of the best tuned final accuracy.

Each group compares methods on the same network (or, for NoProp, which brings its own,
against backprop on the MLP) with the same epochs; ForwardGNN's reference is the same
GNN layers over the same k-NN graph trained by backprop (`model=knn_gnn`).

    python scripts/compare_local_trainers.py                    # the full comparison
    python scripts/compare_local_trainers.py --seeds 0 --rounds 2 --fed-rounds 2 \
        --groups MLP --runs-dir outputs/lt-smoke --out outputs/lt-smoke/report   # a smoke run

Runs land in --runs-dir (default outputs/compare_local_trainers); finished runs are
reused, so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from fedsim.comparison import (
    Cell,
    Grid,
    add_grid_arguments,
    best_setting,
    first_round_at_least,
    metric_at,
    provenance,
    read_rows,
    run_missing,
)
from fedsim.report import mean_std

#: group label -> (overrides of every run in it, {method: overrides}); the first method of
#: each group is its backprop reference.
GROUPS: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "MLP": (["model=mlp"], {
        "backprop": ["client=sgd"],
        "tpSGD": ["client=tpsgd"],
        "tpSGD L2": ["client=tpsgd", "client.loss=mse"],
        "Mono-Forward": ["client=mono_forward"],
    }),
    "CNN1D": (["model=cnn1d"], {
        "backprop": ["client=sgd"],
        "tpSGD": ["client=tpsgd"],
        "tpSGD L2": ["client=tpsgd", "client.loss=mse"],
        "Mono-Forward": ["client=mono_forward"],
    }),
    "ResMLP": (["model=resmlp"], {
        "backprop": ["client=sgd"],
        "AugLocal": ["client=auglocal"],
        "Mono-Forward": ["client=mono_forward"],
        "tpSGD": ["client=tpsgd"],
    }),
    "NoProp": ([], {
        "backprop MLP AdamW": ["client=sgd", "model=mlp", "optimizer=adamw", "client.lr=0.001",
                               "client.weight_decay=0.001", "client.batch_size=128"],
        "NoProp-DT": ["client=noprop", "model=noprop"],
    }),
    "Graph": (["optimizer=adam", "client.lr=0.003", "client.weight_decay=0.0005",
               "client.batch_size=256"], {
        "backprop GNN": ["client=sgd", "model=knn_gnn"],
        "ForwardGNN": ["client=forward_gnn", "model=gnn"],
        "backprop GNN, no graph": ["client=sgd", "model=knn_gnn", "model.k=0"],
        "backprop MLP": ["client=sgd", "model=mlp"],
    }),
}
#: Optimizers whose claims are about speed or tuned accuracy: each runs at every lr of
#: --lrs (same network, weight decay and epochs), evaluated after every epoch.
OPTIMIZERS = {
    "AdamW": ["optimizer=adamw"],
    "AdamP": ["optimizer=adamp"],
    "Conda": ["optimizer=conda"],
}
OPTIMIZER_NETWORK = ["model=resmlp", "client=sgd", "client.weight_decay=0.01"]
#: group -> the centralized rounds (of CENTRAL_EPOCHS) of its paper's training budget, when
#: longer than --rounds: the group also runs there, so its claim is checked at the paper's
#: budget as well as at the table's.
PAPER_ROUNDS = {"NoProp": 20}  # NoProp-DT: 100 epochs
SPEED_FRACTIONS = (0.9, 0.95)
CENTRAL_EPOCHS, FED_EPOCHS, MEMORY_BATCH = 5, 2, 128
ACCURACY = "server/accuracy"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--fed-rounds", type=int, default=30)
    parser.add_argument("--no-federated", dest="federated", action="store_false")
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3, 1e-2],
                        help="the lr grid of the optimizer comparison")
    parser.add_argument("--no-optimizers", dest="optimizers", action="store_false",
                        help="skip the lr-tuned optimizer comparison")
    add_grid_arguments(parser, "local_trainers", rounds=10)
    parser.set_defaults(out=Path("docs/results/local-trainers"))
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="only run the missing cells")
    return parser.parse_args(argv)


def budget_label(group: str, rounds: int, args: argparse.Namespace) -> str:
    """The table's name for `group` run for `rounds` (its own name at --rounds)."""
    return group if rounds == args.rounds else f"{group}, {rounds} rounds"


def central_rounds(args: argparse.Namespace, group: str) -> list[int]:
    """The centralized budgets `group` runs at: --rounds, and its paper's when longer."""
    paper = PAPER_ROUNDS.get(group, 0)
    return [args.rounds, paper] if paper > args.rounds else [args.rounds]


def central_budgets(args: argparse.Namespace) -> list[tuple[str, int]]:
    """Every (group, rounds) the centralized comparison runs, in the table's order."""
    return [(group, rounds) for group in args.groups for rounds in central_rounds(args, group)]


def central_grid(args: argparse.Namespace, group: str, rounds: int) -> Grid:
    """`group` centralized for `rounds`; each budget has its own runs."""
    shared, methods = GROUPS[group]
    return Grid(methods=methods, datasets={budget_label(group, rounds, args): shared},
                value_key="num_clients", values=[1],
                seeds=args.seeds, runs_dir=args.runs_dir / "centralized",
                base=["+experiment=centralized", "dataset=mnist1d", f"num_rounds={rounds}",
                      f"client.local_epochs={CENTRAL_EPOCHS}", "logger=none", "progress=false",
                      *args.set])


def federated_grid(args: argparse.Namespace, group: str) -> Grid:
    shared, methods = GROUPS[group]
    return Grid(methods=methods, datasets={group: shared}, value_key="partition.alpha",
                values=[0.5], seeds=[0], runs_dir=args.runs_dir / "federated",
                base=["dataset=mnist1d", "partition=dirichlet", "num_clients=20",
                      "clients_per_round=10", "evaluation.clients_per_round=0",
                      f"num_rounds={args.fed_rounds}", f"client.local_epochs={FED_EPOCHS}",
                      "logger=none", "progress=false", *args.set])


def optimizer_grid(args: argparse.Namespace) -> Grid:
    """Every optimizer at every lr, centralized, in the same rounds as the groups (the
    optimizer's state restarts every round, as for every fedsim trainer)."""
    return Grid(methods=OPTIMIZERS, datasets={"ResMLP": OPTIMIZER_NETWORK}, value_key="client.lr",
                values=args.lrs, seeds=args.seeds, runs_dir=args.runs_dir / "optimizers",
                base=["+experiment=centralized", "dataset=mnist1d", f"num_rounds={args.rounds}",
                      f"client.local_epochs={CENTRAL_EPOCHS}", "logger=none", "progress=false",
                      *args.set])


def activation_peak(cell: Cell) -> int:
    """Peak bytes saved for backward in one training step of this cell's trainer."""
    from fedsim.config import compose
    from fedsim.datasets.federated import build_federated_data
    from fedsim.runtime import build_trainer, initial_model

    overrides = [o for o in cell.overrides if not o.startswith("output_dir=")]
    cfg = compose([*overrides, "device=cpu", f"output_dir={cell.run_dir}/memory"])
    data = build_federated_data(cfg)
    trainer = build_trainer(cfg, data)
    model = initial_model(cfg, data).train()
    client = data.client(0)
    x, y = client.x_train[:MEMORY_BATCH], client.y_train[:MEMORY_BATCH]
    from fedsim.clients.local_learning import saved_activation_peak

    torch.manual_seed(0)
    with saved_activation_peak() as peak:
        loss = trainer.objective(model, x, y)
        if loss.requires_grad:
            loss.backward()
    return peak[0]


def parameter_count(cell: Cell) -> tuple[int, int]:
    """(parameters of the global model, of which used at inference)."""
    from fedsim.clients.local_learning import network_and_aux
    from fedsim.config import compose
    from fedsim.datasets.federated import build_federated_data
    from fedsim.runtime import initial_model

    cfg = compose([o for o in cell.overrides if not o.startswith("output_dir=")])
    model = initial_model(cfg, build_federated_data(cfg))
    net, _ = network_and_aux(model)
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in net.parameters())


def mean_of(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def fmt(values: list[float]) -> str:
    if not values or not all(map(math.isfinite, values)):
        return "n/a"
    mean, std = mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def collect(args: argparse.Namespace) -> list[dict]:
    """One record per (group, budget, method): accuracies per seed, memory, sizes, run
    time. `group` is the table's label (with the rounds when not --rounds), `base_group`
    the GROUPS key; the federated runs belong to the --rounds record."""
    records = []
    for group, rounds in central_budgets(args):
        central = central_grid(args, group, rounds).cells()
        federated = (federated_grid(args, group).cells()
                     if args.federated and rounds == args.rounds else [])
        for method in GROUPS[group][1]:
            mine = [c for c in central if c.method == method]
            fed = [c for c in federated if c.method == method]
            total, inference = parameter_count(mine[0])
            records.append({
                "group": budget_label(group, rounds, args), "base_group": group,
                "method": method, "rounds": rounds,
                "central_accuracy": [metric_at(read_rows(c.run_dir), ACCURACY, rounds)
                                     for c in mine],
                "seeds": [c.seed for c in mine],
                "federated_accuracy": [metric_at(read_rows(c.run_dir), ACCURACY,
                                                 args.fed_rounds) for c in fed],
                "activation_peak_bytes": activation_peak(mine[0]),
                "parameters": total, "inference_parameters": inference,
                "central_run_s": [read_rows(c.run_dir)[-1]["wall_time_s"] for c in mine],
            })
    return records


def table(records: list[dict], rounds: int, fed_rounds: int) -> str:
    lines = ["| group | method | centralized acc. % | vs first | federated acc. % | "
             "activation peak KiB | x first | params (inference) | s / run |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    first: dict[str, dict] = {}
    for r in records:
        ref = first.setdefault(r["group"], r)
        gap = 100 * (mean_of(r["central_accuracy"])
                     - mean_of(ref["central_accuracy"]))
        lines.append(
            f"| {r['group']} | {r['method']} | {fmt(r['central_accuracy'])} | "
            f"{'' if r is ref else f'{gap:+.1f}'} | {fmt(r['federated_accuracy'])} | "
            f"{r['activation_peak_bytes'] / 1024:.0f} | "
            f"{r['activation_peak_bytes'] / ref['activation_peak_bytes']:.2f} | "
            f"{r['parameters']:,} ({r['inference_parameters']:,}) | "
            f"{mean_of(r['central_run_s']):.0f} |")
    return "\n".join(lines)


#: (group, method, reference method) -> what the paper claims, checked here as: within NEAR
#: points of the reference (or above it). The optimizers' claims are checked at tuned lrs
#: (`optimizer_claims`).
CLAIMS = {
    ("MLP", "tpSGD", "backprop"):
        ("tpSGD: within 5% of backprop on shallow MLP/CNN/RNN"),
    ("CNN1D", "tpSGD", "backprop"):
        ("tpSGD: within 5% of backprop on shallow MLP/CNN/RNN"),
    ("MLP", "Mono-Forward", "backprop"):
        ("Mono-Forward: matches or beats backprop on MLPs"),
    ("CNN1D", "Mono-Forward", "backprop"):
        ("Mono-Forward: matches or beats backprop"),
    ("ResMLP", "AugLocal", "backprop"):
        ("AugLocal: accuracy comparable to backprop (ResNets on CIFAR/ImageNet) with less "
         "GPU memory"),
    ("NoProp", "NoProp-DT", "backprop MLP AdamW"):
        ("NoProp-DT: close to backprop (MNIST 99.4; CIFAR-100 46.1 vs 47.8); here against "
         "backprop on the MLP (NoProp's network is its own: 10 blocks)"),
    ("Graph", "ForwardGNN", "backprop GNN"):
        ("ForwardGNN: on par with or better than backprop-trained GNNs on node "
         "classification benchmarks; here against the same SAGE layers over the same "
         "k-NN graph, trained by backprop"),
}
NEAR = 5.0  # points: "within 5%" read as 5 accuracy points


def optimizer_speed(args: argparse.Namespace) -> dict:
    """Each optimizer's final accuracy per lr, its tuned lr (best mean final), and the rounds
    it needs at that lr to reach each fraction of the best tuned final accuracy, per seed."""
    cells = optimizer_grid(args).cells()
    finals: dict[str, dict[float, list[float]]] = {}
    for cell in cells:
        finals.setdefault(cell.method, {}).setdefault(cell.value, []).append(
            metric_at(read_rows(cell.run_dir), ACCURACY, args.rounds))
    tuned = {method: best_setting(by_lr) for method, by_lr in finals.items()}
    best = max(statistics.fmean(finals[m][lr]) for m, lr in tuned.items())
    reach = {method: {fraction: [first_round_at_least(read_rows(c.run_dir), ACCURACY,
                                                      fraction * best)
                                 for c in cells if c.method == method and c.value == lr]
                      for fraction in SPEED_FRACTIONS}
             for method, lr in tuned.items()}
    return {"finals": finals, "tuned": tuned, "best_final": best, "rounds_to": reach}


def rounds_text(values: list[float]) -> str:
    """Mean rounds to a target over seeds, or how many seeds never reached it."""
    missed = sum(not math.isfinite(v) for v in values)
    return f"{statistics.fmean(values):.1f}" if not missed else f"not in {missed} of {len(values)}"


def optimizer_section(args: argparse.Namespace, speed: dict) -> str:
    """The lr-tuned optimizer table: final accuracy per lr, tuned lr, rounds to targets."""
    lrs = args.lrs
    head = ["optimizer", *(f"lr {lr:g}" for lr in lrs), "tuned lr",
            *(f"rounds to {100 * f:g}%" for f in SPEED_FRACTIONS)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for method, by_lr in speed["finals"].items():
        cells = [fmt(by_lr[lr]) for lr in lrs]
        tuned = speed["tuned"][method]
        cells += [f"{tuned:g}", *(rounds_text(speed["rounds_to"][method][f])
                                  for f in SPEED_FRACTIONS)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed_ratio_text(ours: list[float], ref: list[float]) -> tuple[str, bool]:
    """How much faster Conda (`ours`, rounds per seed) reaches a target than AdamW (`ref`),
    and whether that is at least 2x; a seed that never reaches it is counted, not averaged."""
    if not all(map(math.isfinite, ours)):
        return f"Conda misses it in {sum(not math.isfinite(v) for v in ours)} of {len(ours)} " \
               "seeds", False
    if not all(map(math.isfinite, ref)):
        return (f"AdamW misses it in {sum(not math.isfinite(v) for v in ref)} of {len(ref)} "
                f"seeds, Conda needs {statistics.fmean(ours):.1f} rounds"), True
    ratio = statistics.fmean(ref) / statistics.fmean(ours)
    return (f"{statistics.fmean(ours):.1f} rounds against {statistics.fmean(ref):.1f} "
            f"({ratio:.1f}x as fast)"), ratio >= 2


def optimizer_claims(speed: dict) -> list[str]:
    """Conda's speed claim and AdamP's accuracy claim, each against AdamW, both lr-tuned."""
    finals, tuned = speed["finals"], speed["tuned"]
    lines = []
    if {"AdamW", "AdamP"} <= set(finals):
        gap = 100 * (statistics.fmean(finals["AdamP"][tuned["AdamP"]])
                     - statistics.fmean(finals["AdamW"][tuned["AdamW"]]))
        lines.append(f"- **AdamP: better than AdamW on scale-invariant (normalized) weights.** "
                     f"ResMLP, each at its tuned lr: {gap:+.1f} points: "
                     f"{'holds here' if gap > 0 else 'falls short here'}.")
    if {"AdamW", "Conda"} <= set(finals):
        parts, holds = [], True
        for fraction in SPEED_FRACTIONS:
            ours, ref = (speed["rounds_to"][m][fraction] for m in ("Conda", "AdamW"))
            part, ok = speed_ratio_text(ours, ref)
            parts.append(f"to {100 * fraction:g}%: {part}")
            holds = holds and ok
        lines.append(f"- **Conda: 2-2.5x AdamW's convergence speed (LLaMA pre-training).** "
                     f"ResMLP, each at its tuned lr, rounds to a fraction of the best tuned "
                     f"final accuracy; {'; '.join(parts)}: "
                     f"{'holds here' if holds else 'falls short here'}.")
    return lines


def claim_lines(records: list[dict]) -> list[str]:
    """One line per method with a paper claim: the claim, what was measured here."""
    by_key = {(r["group"], r["method"]): r for r in records}
    lines = []
    for (group, method, reference), claim in CLAIMS.items():
        for ours in (r for r in records if (r["base_group"], r["method"]) == (group, method)):
            ref = by_key.get((ours["group"], reference))
            if ref is None:
                continue
            gap = 100 * (mean_of(ours["central_accuracy"]) - mean_of(ref["central_accuracy"]))
            memory = ours["activation_peak_bytes"] / ref["activation_peak_bytes"]
            text = (f"- **{claim}.** {group}: {gap:+.1f} points against {reference} "
                    f"(centralized, {ours['rounds']} rounds x {CENTRAL_EPOCHS} epochs), "
                    f"activation peak x{memory:.2f}")
            holds = gap >= -NEAR
            lines.append(f"{text}: {'holds here' if holds else 'falls short here'}.")
    return lines


def budget_text(args: argparse.Namespace) -> str:
    """The sentence naming the groups also run for their paper's epochs ("" for none)."""
    longer = [(g, r) for g, r in central_budgets(args) if r != args.rounds]
    if not longer:
        return ""
    runs = ", ".join(f'"{budget_label(g, r, args)}" ({r * CENTRAL_EPOCHS} epochs)'
                     for g, r in longer)
    return (f" Groups whose paper trains longer also run centralized for the paper's epochs"
            f" (the optimizer still restarts each round, so not the paper's schedule),"
            f" each with its backprop reference at the same budget and no federated runs: {runs}.")


def write_report(args: argparse.Namespace, cells: list[Cell]) -> None:
    records = collect(args)
    speed = optimizer_speed(args) if args.optimizers else {"finals": {}}
    optimizer_text = "" if not args.optimizers else f"""
## Optimizers at tuned learning rates

AdamW, AdamP and Conda on the ResMLP (client weight decay 0.01), centralized, at each lr
of the grid, {args.rounds} rounds x {CENTRAL_EPOCHS} epochs as above, seeds
{", ".join(map(str, args.seeds))}. As in every fedsim trainer, the optimizer's state (Adam's
moments, Conda's projection) restarts each round. The tuned lr of each is the one with the
best mean final test accuracy (there is no validation split: the grid is small and every
optimizer is tuned the same way). Speed is the rounds each needs, at its tuned lr, to reach
a fixed fraction of the best tuned final accuracy
({100 * speed.get("best_final", math.nan):.1f}%), mean over seeds.

{optimizer_section(args, speed)}
"""
    text = f"""# Non-federated methods as fedsim trainers: accuracy and memory on MNIST-1D

{provenance("scripts/compare_local_trainers.py", cells, args.workers)}

Centralized: `+experiment=centralized` (one client holds all 4000 training samples),
{args.rounds} rounds x {CENTRAL_EPOCHS} epochs, server test accuracy (1000 samples) after the
last round, mean ± std over seeds {", ".join(map(str, args.seeds))}. Federated: 20 clients,
Dirichlet α = 0.5, 10 a round, {args.fed_rounds} rounds x {FED_EPOCHS} epochs, seed 0, same
trainer settings. "vs first": points against the group's first row, the backprop reference
with the same network and epochs. Activation peak: bytes autograd holds for backward
during one training step on a batch of {MEMORY_BATCH}, the layer-local methods'
selling point (parameters and optimizer state aside; auxiliary modules' own
parameters are counted in the next column, with the inference network's in brackets).
NoProp brings a network of its own; its reference is backprop on the MLP over the same
features (with NoProp's AdamW and batch 128), so there "vs first" and the memory ratio
compare different networks.{budget_text(args)}
The Graph group's reference is a GNN trained by backprop (`model=knn_gnn`): the same SAGE
layers as ForwardGNN's over the same k-NN graph of each batch of 256, then a linear head;
"no graph" is those layers with no edges (`model.k=0`); every Graph row uses Adam, lr
0.003, weight decay 5e-4. Every other method uses its `fedsim/conf/client` defaults (SGD
lr 0.05, momentum 0.9, batch 32 for the layer-local ones) unless the group says otherwise.

{table(records, args.rounds, args.fed_rounds)}
{optimizer_text}
## Against the papers' claims

"Holds here": the centralized accuracy is within {NEAR:g} points of the reference (or
above it) for accuracy claims; for the optimizers, each at its tuned lr, AdamP's final
accuracy above AdamW's, and Conda reaching each fraction of the best final accuracy in at
most half AdamW's rounds.
All on MNIST-1D at these budgets: it says nothing about the papers' own datasets (CIFAR,
ImageNet, LLM pre-training, graph benchmarks), which need a network and far more
compute.

{chr(10).join(claim_lines(records) + optimizer_claims(speed))}
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(records, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cells = [c for g, r in central_budgets(args) for c in central_grid(args, g, r).cells()]
    if args.federated:
        cells += [c for g in args.groups for c in federated_grid(args, g).cells()]
    if args.optimizers:
        cells += optimizer_grid(args).cells()
    run_missing(cells, args.workers)
    if args.report:
        write_report(args, cells)
        print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
