"""Per-round records of a run: metrics.jsonl, summary.json, plots, tracker, progress bar."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from fedsim.backends.base import MeteredGrid
from fedsim.datasets.federated import FederatedData
from fedsim.flower_apps import clients_description
from fedsim.metrics import GROUPS
from fedsim.run_dir import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, claim

if TYPE_CHECKING:
    from fedsim.plots import Background

CLASS_GROUPS_FILE = "class_groups.json"
UPDATES_FILE = "updates.jsonl"  # one line per entry of a strategy's update_log hook


def _plots() -> ModuleType:
    """`fedsim.plots`, imported on first use: matplotlib costs about a second to import,
    which every process that records nothing (each deployed ClientApp message, plots off)
    would otherwise pay."""
    from fedsim import plots

    return plots


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """SHA-256 over fedsim's source and Hydra config files: which code produced a run.

    Comparisons redo a run whose fingerprint differs from the current one, so a
    results table never mixes runs of different code.
    """
    package = Path(__file__).resolve().parent
    files = sorted(package.rglob("*.py")) + sorted((package / "conf").rglob("*.yaml"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(package.parent)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def default_run_dir() -> Path:
    """`outputs/run-<timestamp>` for runs started without an output_dir."""
    return Path("outputs") / datetime.now().strftime("run-%Y%m%d-%H%M%S-%f")


def free_name(path: Path, tag: str) -> Path:
    """The first `<name>.<tag><n>` beside `path` that does not exist."""
    for n in range(1, 10_000):
        candidate = path.with_name(f"{path.name}.{tag}{n}")
        if not candidate.exists():
            return candidate
    raise RuntimeError(f"too many set-aside copies of {path}")


def set_aside(path: Path, tag: str) -> Path:
    """Rename `path` to the first free `<name>.<tag><n>` beside it, so nothing is
    overwritten or lost; return the new path."""
    return path.rename(free_name(path, tag))


def prepare_run_dir(output_dir: str | None) -> Path:
    """Claim and create the run directory (`fedsim.run_dir.claim`): refused when it already
    holds a run, or another run holds it right now."""
    return claim(Path(output_dir) if output_dir else default_run_dir(), fresh=True)


def group_members(groups: np.ndarray | None) -> dict[str, list[int]]:
    """{"head": [classes], "middle": [...], "tail": [...]} from group indices ({} for None)."""
    if groups is None:
        return {}
    return {name: np.flatnonzero(groups == i).tolist() for i, name in enumerate(GROUPS)}


def _flat(prefix: str, record: MetricRecord | None) -> dict[str, float]:
    if record is None:
        return {}
    return {
        f"{prefix}/{k}": float(v) for k, v in record.items() if isinstance(v, int | float)
    }


def rewrite_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    """Copy `path` aside whole (`*.resumed<n>`), then replace it atomically with `rows` as
    JSON lines: a kill at any moment leaves the old file or the new one, and the copy."""
    if path.exists():
        shutil.copy2(path, free_name(path, "resumed"))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(finite_or_null(row)) + "\n" for row in rows)
    os.replace(tmp, path)


def finite_or_null(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with NaN and inf as None (JSON has no such numbers)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()}


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of `path` ([] if missing), without a line a kill cut short."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunRecorder:
    """Collects each round's metrics from the strategy, the grid and the server evaluation.

    The engine's `EngineStrategy` hands it each round's aggregated metrics
    (`record_train`, `record_client_eval`; any Flower strategy works unchanged), and
    `end_of_round` is the round loop's `evaluate_fn`, which Flower calls after each round.
    """

    def __init__(
        self,
        cfg: DictConfig,
        grid: MeteredGrid,
        evaluate: Any,
        logger: Any,
        run_dir: Path,
    ) -> None:
        self.cfg = cfg
        self.grid = grid
        self.evaluate = evaluate
        self.logger = logger
        self.run_dir = run_dir
        self.rows: list[dict[str, Any]] = []
        self._train: MetricRecord | None = None
        self._client_eval: MetricRecord | None = None
        self._start = time.perf_counter()
        self._round_start = self._start
        self._metrics_file = open(run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        self._bar: tqdm | None = None
        self.class_groups: dict[str, list[int]] = {}
        self._update_log: list[dict[str, Any]] | None = None
        self._updates_written = 0
        self._label_plot: Background | None = None

    def write_inputs(self, data: FederatedData) -> None:
        """Resolved config, class groups and label-distribution plot, before round 1.

        A single client (centralized training) has no label distribution to compare,
        so it gets no plot (which was a fifth of a short centralized run's cost).
        """
        OmegaConf.save(self.cfg, self.run_dir / CONFIG_FILE, resolve=True)
        self.class_groups = group_members(data.class_groups)
        if self.class_groups:
            (self.run_dir / CLASS_GROUPS_FILE).write_text(json.dumps(self.class_groups))
        if self.cfg.num_clients > 1 and self.plotting:  # drawn beside round 1: `Background`
            plots = _plots()
            self._label_plot = plots.Background(
                plots.plot_label_distribution,
                data.partitioner,
                self.run_dir / "plots" / "label_distribution.png",
                self.cfg.num_clients,
                plots.run_title(self.cfg),
            )
        self._begin(done=0, elapsed_s=0.0)

    def resume(self, done: int, elapsed_s: float, rows: list[dict[str, Any]],
               updates_written: int) -> None:
        """Go on with a run stopped after its checkpoint at round `done`.

        metrics.jsonl gets back the checkpoint's rows (round 0 to `done`), and
        updates.jsonl its lines up to `done`; each file as it was is kept aside
        as `*.resumed<n>`. Rows a killed run wrote after the checkpoint are redone.
        """
        groups = self.run_dir / CLASS_GROUPS_FILE
        self.class_groups = json.loads(groups.read_text()) if groups.exists() else {}
        self._metrics_file.close()
        self.rows = list(rows)
        rewrite_lines(self.run_dir / METRICS_FILE, self.rows)
        updates = self.run_dir / UPDATES_FILE
        if updates.exists():
            rewrite_lines(updates, [u for u in read_lines(updates) if u["round"] <= done])
        self._metrics_file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        self._updates_written = updates_written
        self._begin(done, elapsed_s)

    def _begin(self, done: int, elapsed_s: float) -> None:
        """Start the tracker and the progress bar; the clock goes on from `elapsed_s`."""
        self.logger.start(
            OmegaConf.to_container(self.cfg, resolve=True), str(self.run_dir), self.run_dir.name
        )
        self._bar = tqdm(
            total=self.cfg.num_rounds, initial=done, desc="rounds", unit="rnd",
            disable=not self.cfg.progress, dynamic_ncols=True,
        )
        self._round_start = time.perf_counter()
        self._start = self._round_start - elapsed_s

    def elapsed_s(self) -> float:
        """Wall time of the run so far (across resumes)."""
        return time.perf_counter() - self._start

    def updates_written(self) -> int:
        """Entries of the strategy's update log already in updates.jsonl."""
        return self._updates_written

    def record_train(self, server_round: int, replies: list[Message],
                     arrays: ArrayRecord | None, metrics: MetricRecord | None) -> None:
        """Keep the round's aggregated train metrics (an `EngineStrategy` train observer)."""
        self._train = metrics

    def record_client_eval(self, server_round: int, metrics: MetricRecord | None) -> None:
        """Keep the round's aggregated client-eval metrics (an `EngineStrategy` observer)."""
        self._client_eval = metrics

    def follow_updates(self, update_log: list[dict[str, Any]] | None) -> None:
        """Write the entries the strategy appends to `update_log` to updates.jsonl, round by
        round (None: the strategy keeps no such log)."""
        self._update_log = update_log

    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Server evaluation when due, then one metrics line (round 0 = before training)."""
        every = self.cfg.evaluation.server_every
        due = every > 0 and (server_round % every == 0 or server_round == self.cfg.num_rounds)
        server = MetricRecord(self.evaluate(arrays)) if due else None
        if server_round == 0:
            self.rows.append({"round": 0, **_flat("server", server)})
            self._write(self.rows[-1])
            return server
        now = time.perf_counter()
        row = {
            "round": server_round,
            **_flat("train", self._train),
            **_flat("server", server),
            **_flat("client_eval", self._client_eval),
            "round_time_s": now - self._round_start,
            "wall_time_s": now - self._start,
            **self.grid.take_counts(),
        }
        self._round_start = now
        self._train = self._client_eval = None
        self._write_updates()
        self.rows.append(row)
        self._write(row)
        self._bar.update(1)
        self._bar.set_postfix(
            {k.split("/")[-1]: f"{v:.4g}" for k, v in row.items()
             if k in ("server/accuracy", "train/train_loss")}
        )
        return server

    def _write_updates(self) -> None:
        """Append the updates the strategy applied since the last round to updates.jsonl."""
        if self._update_log is None or self._updates_written == len(self._update_log):
            return
        with open(self.run_dir / UPDATES_FILE, "a", encoding="utf-8") as out:
            for entry in self._update_log[self._updates_written:]:
                out.write(json.dumps(entry) + "\n")
        self._updates_written = len(self._update_log)

    def _write(self, row: dict[str, Any]) -> None:
        clean = finite_or_null(row)
        self._metrics_file.write(json.dumps(clean) + "\n")
        self._metrics_file.flush()
        loggable = {k: v for k, v in clean.items() if k != "round" and v is not None}
        self.logger.log(loggable, step=row["round"])

    def finish(self) -> dict[str, Any]:
        """Close the metrics file, write summary.json and the plots (curves, `plots.metrics`)."""
        if self._bar is not None:
            self._bar.close()
        self._metrics_file.close()
        self._wait_for_plots()
        summary = self.summary()
        tmp = self.run_dir / (SUMMARY_FILE + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, self.run_dir / SUMMARY_FILE)
        if self.plotting:
            plots, folder = _plots(), self.run_dir / "plots"
            title = plots.run_title(self.cfg)
            plots.plot_curves(self.rows, folder / "curves.png", title)
            plots.plot_metrics(self.rows, OmegaConf.select(self.cfg, "plots.metrics", default=[]),
                               folder / "metrics.png", title)
        self.logger.finish(summary)
        return summary

    def abort(self) -> None:
        """Close what is open after a failed run; no summary, so the run reads as unfinished."""
        if self._bar is not None:
            self._bar.close()
        self._metrics_file.close()
        self._wait_for_plots()
        self.logger.finish({"status": "failed"}, failed=True)

    @property
    def plotting(self) -> bool:
        """`plots.enabled` (runs of older fedsim have no such key: they plotted)."""
        return bool(OmegaConf.select(self.cfg, "plots.enabled", default=True))

    def _wait_for_plots(self) -> None:
        if self._label_plot is not None:
            self._label_plot.wait()
            self._label_plot = None

    def summary(self) -> dict[str, Any]:
        last = self.rows[-1]
        destroyed = [r["round"] for r in self.rows if r.get("model_destroyed")]
        accuracies = [r["server/accuracy"] for r in self.rows if "server/accuracy" in r]
        evaluated = [r for r in self.rows if "server/accuracy" in r]
        return {
            "num_rounds": last["round"],
            "final": {k: v for k, v in last.items() if "/" in k},
            "final_server_accuracy": evaluated[-1]["server/accuracy"] if evaluated else None,
            "best_server_accuracy": max(accuracies) if accuracies else None,
            "wall_time_s": time.perf_counter() - self._start,
            **{
                key: sum(r.get(key, 0) for r in self.rows)
                for key in ("bytes_down", "bytes_up", "train_failures", "evaluate_failures",
                            "skipped_rounds")
            },
            "strategy": str(self.cfg.strategy._target_).rsplit(".", 1)[-1],
            "client": str(self.cfg.client._target_).rsplit(".", 1)[-1],
            "clients": clients_description(self.cfg),
            "seed": self.cfg.seed,
            **({"model_destroyed_round": destroyed[0]} if destroyed else {}),
            **({"class_groups": self.class_groups} if self.class_groups else {}),
            "code": code_fingerprint(),
        }
