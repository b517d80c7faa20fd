"""Shared fixtures: tiny configs that run in a second or two on a CPU."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from fedsim.config import compose

# generated datasets are cached here, not in the user's ~/.cache (subprocesses inherit it)
os.environ.setdefault("FEDSIM_CACHE", str(Path(tempfile.gettempdir()) / "fedsim-test-cache"))

TINY = [
    "logger=none",
    "progress=false",
    "num_clients=6",
    "clients_per_round=3",
    "num_rounds=2",
    "evaluation.clients_per_round=2",
    "model=mlp",
    "client.local_epochs=1",
    "client.momentum=0.0",
    "plots.enabled=false",  # plotting was most of a tiny run's time; test_engine draws them
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files marked `long_running(seconds=...)` first, longest first (the rest keep
    their order). `make test` runs one file per worker (`--dist loadfile`, in this order:
    `--no-loadscope-reorder`); a 3-minute file handed out last ran alone at the end."""
    def seconds(item: pytest.Item) -> float:
        mark = item.get_closest_marker("long_running")
        return float(mark.kwargs.get("seconds", mark.args[0] if mark.args else 0)) if mark else 0

    items.sort(key=lambda item: -seconds(item))


@pytest.fixture
def tiny_cfg(tmp_path):
    """`tiny_cfg(*overrides)` -> a composed config writing into a fresh tmp dir."""
    counter = iter(range(1000))

    def make(*overrides: str):
        out = tmp_path / f"run{next(counter)}"
        return compose([*TINY, f"output_dir={out}", *overrides])

    return make


def read_metrics(run_dir: str | Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in rows]
