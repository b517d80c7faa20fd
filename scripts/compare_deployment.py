"""Deployed vs simulated: docs/results/deployment.{md,json}.

Each preset (`deploy_fedavg`, `deploy_fedld`: MNIST-1D, 4 clients, Dirichlet 0.5,
all clients every round, 1 local epoch) runs twice per seed with the same config:
on Flower's deployment runtime (a SuperLink and 4 SuperNodes on loopback, TLS and
SuperNode authentication on, `backend=deployment`) and in this process
(`backend=inprocess`). The table gives the final server accuracy of both, the
largest difference of any logged metric over all rounds, and the run times.

    python scripts/compare_deployment.py                       # seeds 0 and 1, 5 rounds
    python scripts/compare_deployment.py --seeds 0 --rounds 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedsim.comparison import Grid, add_grid_arguments, provenance, read_rows, run_missing

PRESETS = {"FedAvg": ["+experiment=deploy_fedavg"], "FedLD": ["+experiment=deploy_fedld"]}
BACKENDS = {"deployed": ["backend=deployment"], "in-process": ["backend=inprocess"]}
TIMING = ("wall_time_s", "round_time_s")


def largest_difference(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[float, str]:
    """The largest |a - b| over every metric both runs logged in every round, and where
    ("<metric>, round <r>")."""
    if [r["round"] for r in a] != [r["round"] for r in b]:
        raise ValueError("the two runs logged different rounds")
    gaps = [(abs(float(x[key]) - float(y[key])), f"{key}, round {x['round']}")
            for x, y in zip(a, b, strict=True)
            for key in sorted(x.keys() & y.keys()) if key not in TIMING and key != "round"]
    return max(gaps, default=(0.0, "-"))


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines."""
    lines = [header, ["---"] * len(header), *rows]
    return ["| " + " | ".join(line) + " |" for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_grid_arguments(parser, "deployment", rounds=5)
    parser.set_defaults(seeds=[0, 1], workers=1)  # a deployment already uses every core
    args = parser.parse_args()
    grid = Grid(methods=BACKENDS, datasets=PRESETS, value_key="num_rounds",
                values=[args.rounds], seeds=args.seeds, base=list(args.set),
                runs_dir=args.runs_dir)
    cells = grid.cells()
    run_missing(cells, args.workers)
    runs = {(c.dataset, c.method, c.seed): read_rows(c.run_dir) for c in cells}

    rows, raw = [], []
    for preset in PRESETS:
        for seed in args.seeds:
            deployed, local = runs[(preset, "deployed", seed)], runs[(preset, "in-process", seed)]
            difference, where = largest_difference(deployed, local)
            record = {
                "preset": preset, "seed": seed,
                "deployed_accuracy": deployed[-1]["server/accuracy"],
                "inprocess_accuracy": local[-1]["server/accuracy"],
                "largest_metric_difference": difference, "where": where,
                "deployed_s": deployed[-1]["wall_time_s"], "inprocess_s": local[-1]["wall_time_s"],
            }
            raw.append(record)
            per_round = record["deployed_s"] / args.rounds
            rows.append([preset, str(seed), f"{record['deployed_accuracy']:.3f}",
                         f"{record['inprocess_accuracy']:.3f}",
                         f"{record['largest_metric_difference']:.1e} ({record['where']})",
                         f"{record['deployed_s']:.0f} s ({per_round:.1f} s)",
                         f"{record['inprocess_s']:.1f} s"])
    header = ["preset", "seed", "accuracy deployed", "accuracy in-process",
              "largest metric difference", f"deployed run ({args.rounds} rounds; a round)",
              "in-process run"]
    page = "\n".join([
        "# Deployed vs simulated", "",
        provenance("scripts/compare_deployment.py", cells, args.workers), "",
        "The same config and seed on Flower's deployment runtime (SuperLink + 4 SuperNodes on",
        "loopback, TLS and SuperNode authentication on) and in one process. Accuracy is the",
        "server's test accuracy after the last round; the difference is the largest",
        "|deployed - in-process| over every metric logged in every round (losses,",
        "accuracies, bytes, failures). Run times are the ServerApp's wall time.", "",
        *table(header, rows), "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(page)
    Path(f"{args.out}.json").write_text(json.dumps(raw, indent=2))
    print(page)


if __name__ == "__main__":
    main()
