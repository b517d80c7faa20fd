"""Load with faults: a W2-sized population with injected crashes, NaN uploads and hangs.

Runs W2 (../shared/specs/workloads.md: W1 with MNIST-1D resampled with replacement to
about 40 samples a client) at 100,000 registered clients, 100 a round, 20 rounds, in
this process (backend `inprocess`), with `faults.crash_prob=0.1`, `nan_prob=0.05`,
`hang_prob=0.05` (`hang_s` 1.0) and a reply deadline `faults.timeout_s=0.5`. It
checks that:

- the run completes all its rounds;
- the failures the server recorded (metrics.jsonl `train_failures` each round,
  summary.json, and each logged failure's node and cause) equal, exactly, those of
  the seeded fault plan, computed beforehand from the seed alone
  (`fedsim.fault_injection.fault_plan` over `flower_cohorts`);
- memory stays flat: VmRSS after the last round within `--rss-tolerance` (5%) of
  VmRSS after round 5.

It writes a markdown table (`--out`, docs/results/load_faults.md) and the raw
per-round numbers (`--json`), and exits 1 when a check fails.

    python scripts/load_faults.py                               # full size (minutes)
    python scripts/load_faults.py --num-clients 10000 --rounds 5   # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
from dataclasses import asdict
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.fault_injection import CRASH, NAN, TIMEOUT  # noqa: E402
from fedsim.loadtest import LoadResult, LoadSpec, run_load  # noqa: E402

KINDS = (CRASH, NAN, TIMEOUT)
FLAT_FROM = 5  # memory is compared with the RSS after this round


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default = LoadSpec()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-clients", type=int, default=default.num_clients)
    parser.add_argument("--clients-per-round", type=int, default=default.clients_per_round)
    parser.add_argument("--rounds", type=int, default=default.num_rounds)
    parser.add_argument("--samples-per-client", type=int, default=default.samples_per_client)
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--crash-prob", type=float, default=default.crash_prob)
    parser.add_argument("--nan-prob", type=float, default=default.nan_prob)
    parser.add_argument("--hang-prob", type=float, default=default.hang_prob)
    parser.add_argument("--hang-s", type=float, default=default.hang_s)
    parser.add_argument("--timeout-s", type=float, default=default.timeout_s)
    parser.add_argument("--rss-tolerance", type=float, default=0.05,
                        help="largest allowed relative RSS change from round 5 to the last")
    parser.add_argument("--run-dir", help="the run's output directory (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="markdown table to write")
    parser.add_argument("--json", type=Path, help="raw numbers to write")
    return parser.parse_args(argv)


def memory_verdict(result: LoadResult, tolerance: float) -> tuple[bool | None, str]:
    last = result.spec.num_rounds
    early, late = result.rss_mib(min(FLAT_FROM, last)), result.rss_mib(last)
    if early is None or late is None:
        return None, "no VmRSS on this system"
    change = (late - early) / early
    ok = abs(change) <= tolerance
    return ok, (f"{early:.0f} -> {late:.0f} MiB ({change:+.1%}): "
                f"{'flat' if ok else 'NOT flat'} (tolerance {tolerance:.0%})")


def render(result: LoadResult, command: str, tolerance: float) -> str:
    spec, rows = result.spec, result.count_rows()
    totals = {f"{side}_{k}": sum(r[f"{side}_{k}"] for r in rows)
              for side in ("expected", "recorded") for k in KINDS}
    times = [r["round_time_s"] for r in rows]
    timeouts = totals["expected_timeout"]
    mismatches = result.mismatches()
    flat, memory = memory_verdict(result, tolerance)
    peak = max(s.hwm_kib for s in result.probe.samples) / 1024
    lines = [
        "# Load with faults (W2 population)",
        "",
        f"Measured on {date.today().isoformat()} ({os.cpu_count()} CPUs, "
        f"{platform.machine()}, Python {platform.python_version()}), backend `inprocess`, "
        f"seed {spec.seed}. Regenerate with:",
        "",
        f"    {command}",
        "",
        f"{spec.num_clients:,} registered clients (MNIST-1D train split resampled with "
        f"replacement, {spec.samples_per_client} samples a client, IID), "
        f"{spec.clients_per_round} a round, {spec.num_rounds} rounds, W1's MLP and SGD, no "
        f"evaluation. Injected: crash {spec.crash_prob}, NaN upload {spec.nan_prob}, hang "
        f"{spec.hang_prob} ({spec.hang_s} s, against a {spec.timeout_s} s reply deadline, so "
        "every hung reply is lost). Expected counts come from the seeded fault plan "
        "(`fault_plan` over `flower_cohorts`, computed before the run); recorded ones "
        "from the failures the server logged with their node and cause, and "
        "`train_failures` from metrics.jsonl. The split is fedsim's stock `partition=iid`.",
        "",
        "| | value |",
        "|---|---:|",
        f"| rounds completed | {result.summary.get('num_rounds')} of {spec.num_rounds} |",
        f"| wall time (whole run) | {result.wall_s:.1f} s |",
        f"| set-up (config, data, {spec.num_clients:,} partitions, model, plots) | "
        f"{result.setup_s:.1f} s |",
        f"| per round: median / mean / max | {statistics.median(times):.2f} / "
        f"{statistics.mean(times):.2f} / {max(times):.2f} s |",
        f"| of which hung clients' sleep | {timeouts} x {spec.hang_s} s = "
        f"{timeouts * spec.hang_s:.0f} s in all |",
        *(f"| {k} faults: expected / recorded | {totals[f'expected_{k}']} / "
          f"{totals[f'recorded_{k}']} |" for k in KINDS),
        f"| train_failures: plan / metrics.jsonl / summary.json | "
        f"{sum(r['expected_failures'] for r in rows)} / "
        f"{sum(r['train_failures'] or 0 for r in rows)} / "
        f"{result.summary.get('train_failures')} |",
        f"| (round, client, kind) pairs differing from the plan | "
        f"{'none' if not mismatches else len(mismatches)} |",
        f"| RSS after round {min(FLAT_FROM, spec.num_rounds)} -> round {spec.num_rounds} | "
        f"{memory} |",
        f"| peak RSS (VmHWM) | {peak:.0f} MiB |",
        "",
        "Per round (c / n / t: crash, NaN, timeout; expected = recorded in every row "
        "unless marked):",
        "",
        "| round | time s | expected c / n / t | recorded c / n / t | train_failures | "
        "RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        want = " / ".join(str(row[f"expected_{k}"]) for k in KINDS)
        got = " / ".join(str(row[f"recorded_{k}"]) for k in KINDS)
        mark = "" if want == got and row["train_failures"] == row["expected_failures"] \
            else " **differs**"
        rss = result.rss_mib(row["round"])
        lines.append(f"| {row['round']} | {row['round_time_s']:.2f} | {want} | {got}{mark} | "
                     f"{row['train_failures']} | {rss:.0f} |")
    if mismatches:
        lines += ["", "Differences:", "", *(f"- {m}" for m in mismatches)]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = LoadSpec(num_clients=args.num_clients, clients_per_round=args.clients_per_round,
                    num_rounds=args.rounds, samples_per_client=args.samples_per_client,
                    seed=args.seed, crash_prob=args.crash_prob, nan_prob=args.nan_prob,
                    hang_prob=args.hang_prob, hang_s=args.hang_s, timeout_s=args.timeout_s)
    run_dir = args.run_dir or str(Path(tempfile.mkdtemp(prefix="load-faults-")) / "run")
    command = "python scripts/load_faults.py " + shlex.join(argv if argv is not None
                                                             else sys.argv[1:])
    result = run_load(spec, run_dir)
    text = render(result, command.strip(), args.rss_tolerance)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "spec": asdict(spec),
            "command": command.strip(),
            "wall_s": result.wall_s,
            "setup_s": result.setup_s,
            "rounds": result.count_rows(),
            "memory": [{"round": s.round, "rss_kib": s.rss_kib, "hwm_kib": s.hwm_kib}
                       for s in result.probe.samples],
            "mismatches": result.mismatches(),
            "summary": {k: v for k, v in result.summary.items()
                        if k in ("num_rounds", "wall_time_s", "train_failures",
                                 "skipped_rounds", "code")},
        }, indent=1) + "\n")
    flat, _ = memory_verdict(result, args.rss_tolerance)
    return 1 if result.mismatches() or flat is False else 0


if __name__ == "__main__":
    sys.exit(main())
