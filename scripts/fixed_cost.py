"""fedsim's fixed costs, as ratios to `python -c "import torch"` on the same machine.

    python scripts/fixed_cost.py [--repeats 3] [--out docs/results/fixed-cost.json]

Each case runs the installed `fedsim` in a fresh empty folder, `--repeats` times,
interleaved with the torch import so that the machine's load hits all alike; the
median wall time of each is reported, with its ratio to the torch import.
For the 1-round run it also reports the time from the "run finished" line to the
process's exit (the shutdown cost).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

FEDSIM = str(Path(sys.executable).with_name("fedsim"))
CASES = {
    "import torch": [sys.executable, "-c", "import torch"],
    "fedsim --help": [FEDSIM, "--help"],
    "unknown option (strategy=fedavgg)": [FEDSIM, "strategy=fedavgg"],
    "unknown key (num_round=10)": [FEDSIM, "num_round=10"],
    "bad value (partition.alpha=-1)": [FEDSIM, "partition.alpha=-1"],
    "1-round run (num_rounds=1)": [FEDSIM, "num_rounds=1", "progress=false"],
}
FINISHED = "run finished"


def timed(cmd: list[str]) -> tuple[float, float | None, int]:
    """Wall seconds of `cmd` in an empty folder, seconds after its FINISHED line, exit code."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=folder, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        finished_at = None
        for line in proc.stdout:
            if FINISHED in line and finished_at is None:
                finished_at = time.perf_counter()
        code = proc.wait()
        end = time.perf_counter()
    return end - start, None if finished_at is None else end - finished_at, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    walls: dict[str, list[float]] = {name: [] for name in CASES}
    tails: list[float] = []
    codes: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, cmd in CASES.items():
            wall, tail, code = timed(cmd)
            walls[name].append(wall)
            codes[name] = code
            if tail is not None:
                tails.append(tail)
    torch_s = statistics.median(walls["import torch"])
    rows = {name: {"median_s": round(statistics.median(w), 2),
                   "ratio_to_import_torch": round(statistics.median(w) / torch_s, 2),
                   "exit_code": codes[name]} for name, w in walls.items()}
    result = {"date": date.today().isoformat(), "repeats": args.repeats,
              "command": "python scripts/fixed_cost.py", "cases": rows,
              "after_run_finished_s": round(statistics.median(tails), 2) if tails else None}
    width = max(map(len, rows))
    print(f"{'case':<{width}}  median s  x import torch  exit")
    for name, row in rows.items():
        print(f"{name:<{width}}  {row['median_s']:8.2f}  {row['ratio_to_import_torch']:13.2f}"
              f"  {row['exit_code']:4d}")
    if tails:
        print(f"1-round run: {result['after_run_finished_s']:.2f} s from '{FINISHED}' to exit")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
