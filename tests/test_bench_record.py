"""The benchmark tables in README.md and docs/benchmark.md are scripts/bench.py's rendering of
its recorded run (docs/results/bench.json), and that rendering reads every number from it."""

import copy
import json
from pathlib import Path

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "docs" / "results" / "bench.json"
bench = load_script("bench")


def test_the_docs_tables_are_the_recorded_run():
    record = json.loads(RECORD.read_text())
    for path in bench.DOCS:
        text = path.read_text()
        assert bench.with_block(text, bench.render(record)) == text, (
            f"{path.name} differs from {RECORD.name}: run `python scripts/bench.py --render "
            f"{RECORD.relative_to(ROOT)}` (or the bench itself after a change that moves it)")


def test_the_table_has_a_row_per_recorded_way_and_its_ratios():
    record = json.loads(RECORD.read_text())
    table = bench.render(record)
    for name, workload in record["workloads"].items():
        base = workload["results"][workload["base"]]
        for way, result in workload["results"].items():
            start = f"| {name} | {way} |"
            row = next(line for line in table.splitlines() if line.startswith(start))
            cells = [cell.strip() for cell in row.strip("|").split("|")]
            assert float(cells[2]) == round(result["seconds"], 2)
            assert cells[3] == f"{result['seconds'] / base['seconds']:.2f}"


def test_a_changed_number_changes_the_table():
    record = json.loads(RECORD.read_text())
    changed = copy.deepcopy(record)
    name, workload = next(iter(changed["workloads"].items()))
    way = next(iter(workload["results"]))
    workload["results"][way]["seconds"] += 1.0
    assert bench.render(changed) != bench.render(record)
