"""The bad-input battery of issue #25, through the real `fedsim` command.

Each row is a command line (and, for some, a data file or a folder prepared first)
that once crashed, hung, or was accepted silently. A row passes when fedsim exits 2
with exactly one `fedsim: error:` line, leaves no run folder behind, and answers
within the time limit. Writes docs/results/input-battery.md (and .json).

    python scripts/input_battery.py                # every row, about 3 minutes on 2 cores
    python scripts/input_battery.py --out <path stem>   # elsewhere (.md and .json)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FEDSIM = [sys.executable, "-c", "from fedsim.cli import main; main()"]
LIMIT_S = 120
#: (row as the issue wrote it, the overrides; {data} / {file} / {port} are filled in)
ROWS = [
    ("seed=99999999999999999999", ["seed=99999999999999999999"]),
    ("data.client_test_ratio=1e6", ["data.client_test_ratio=1e6"]),
    (".npz with a label of 1,000,000", ["dataset=npz", "dataset.path={data}"]),
    ("strategy=bulyan, default 20 clients / 10 a round, num_rounds=50 (runs: a result)",
     ["strategy=bulyan", "num_rounds=50"]),
    ("partition.alpha=inf", ["partition.alpha=inf"]),
    ("partition.alpha=1e-9", ["partition.alpha=1e-9"]),
    ("data.imbalance_factor=1e-300", ["data.imbalance_factor=1e-300"]),
    ("client.lr=inf", ["client.lr=inf"]),
    ("backend=ray backend.address=127.0.0.1:<closed port>",
     ["backend=ray", "backend.address=127.0.0.1:{port}"]),
    ("logger=wandb logger.mode=online, no key", ["logger=wandb", "logger.mode=online"]),
    ("run directory is an existing file", ["hydra.run.dir={file}"]),
    ("run directory under a file", ["hydra.run.dir={file}/sub"]),
    ("strategy=fedavgx", ["strategy=fedavgx"]),
    ("strategy.foo=1", ["strategy.foo=1"]),
    ("seed=nan", ["seed=nan"]),
    ("torch_threads=100000000", ["torch_threads=100000000"]),
    ("optimizer._partial_=false", ["optimizer._partial_=false"]),
    ("~seed", ["~seed"]),
    ("faults.crash_prob=nan", ["faults.crash_prob=nan"]),
]
QUIET = ["logger=none", "progress=false"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare(work: Path) -> dict[str, str]:
    """The data file with a stray label, a plain file, and a closed port."""
    rng = np.random.default_rng(0)
    y = np.arange(200) % 3
    y[0] = 1_000_000
    np.savez(work / "stray-label.npz", x=rng.normal(size=(200, 4)).astype("float32"), y=y)
    (work / "afile").write_text("a file, not a folder\n")
    return {"data": str(work / "stray-label.npz"), "file": str(work / "afile"),
            "port": str(closed_port())}


def run_row(overrides: list[str], cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(HYDRA_FULL_ERROR="0", NETRC=str(cwd / "no-netrc"))
    started = time.monotonic()
    try:
        out = subprocess.run([*FEDSIM, *QUIET, *overrides], cwd=cwd, env=env, text=True,
                             capture_output=True, timeout=LIMIT_S)
        code, stderr = out.returncode, out.stderr
    except subprocess.TimeoutExpired:
        code, stderr = None, ""
    lines = [line.replace(str(cwd.parent), "<tmp>") for line in stderr.splitlines()
             if line.startswith("fedsim: ")]
    left = sorted(str(p.relative_to(cwd)) for p in cwd.glob("outputs/*/*"))
    return {"exit": code, "seconds": round(time.monotonic() - started, 1),
            "fedsim_lines": lines, "traceback": "Traceback" in stderr, "folders_left": left}


def verdict(row: str, result: dict) -> str:
    if result["exit"] is None:
        return "hung"
    if "(runs: a result)" in row:
        return "ran" if result["exit"] == 0 else "failed"
    one_line = result["exit"] == 2 and len(result["fedsim_lines"]) == 1
    return "one line, exit 2" if one_line and not result["folders_left"] else "unclear"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "input-battery"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        fill = prepare(Path(tmp))
        for number, (row, overrides) in enumerate(ROWS):
            cwd = Path(tmp) / f"row{number}"
            cwd.mkdir()
            result = run_row([o.format(**fill) for o in overrides], cwd)
            result.update(row=row, verdict=verdict(row, result))
            results.append(result)
            print(f"{result['verdict']:>17}  {result['seconds']:6.1f} s  {row}", flush=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    Path(args.out).with_suffix(".md").write_text(report(results))


def report(results: list[dict]) -> str:
    tally: dict[str, int] = {}
    for result in results:
        tally[result["verdict"]] = tally.get(result["verdict"], 0) + 1
    lines = ["# Bad-input battery (issue #25)", "",
             "Generated by `python scripts/input_battery.py` (each row through the `fedsim` "
             f"command, {LIMIT_S} s limit; no seed: nothing here is random). Tally: "
             + ", ".join(f"{n} {v}" for v, n in sorted(tally.items())) + ".", "",
             "| input | outcome | s | what fedsim printed |", "| --- | --- | --- | --- |"]
    for r in results:
        said = r["fedsim_lines"][-1] if r["fedsim_lines"] else ""
        said = said.replace("|", "\\|").replace(str(ROOT), ".")
        lines.append(f"| `{r['row']}` | {r['verdict']} | {r['seconds']} | {said} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
