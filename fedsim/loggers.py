"""Experiment-tracker sinks for per-round metrics (local files are always written)."""

from __future__ import annotations

import os
from typing import Any

from fedsim.errors import require


class NoLogger:
    """Keeps only the local outputs."""

    def start(self, config: dict[str, Any], run_dir: str, name: str) -> None:
        """Nothing to open."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Nothing to send."""

    def finish(self, summary: dict[str, Any], failed: bool = False) -> None:
        """Nothing to close."""


class WandbLogger(NoLogger):
    """Weights & Biases; `mode="offline"` (default) writes a local run to sync later."""

    def __init__(
        self,
        project: str = "fedsim",
        entity: str | None = None,
        mode: str = "offline",
        group: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        require(mode in ("offline", "online", "disabled"), "logger.mode",
                "offline, online or disabled", mode)
        self.project, self.entity, self.mode = project, entity, mode
        self.group, self.tags = group, list(tags or [])
        self._run = None

    def start(self, config: dict[str, Any], run_dir: str, name: str) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self._run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            group=self.group,
            tags=self.tags,
            name=name,
            dir=run_dir,
            config=config,
            reinit="finish_previous",
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def finish(self, summary: dict[str, Any], failed: bool = False) -> None:
        if self._run is None:
            return
        for key, value in summary.items():
            if isinstance(value, int | float | str):
                self._run.summary[key] = value
        self._run.finish(exit_code=1 if failed else 0)
        self._run = None
