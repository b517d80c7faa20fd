"""Experiment-tracker sinks for per-round metrics (local files are always written)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from fedsim.errors import ConfigError, require
from fedsim.reachability import connect_problem, host_and_port

if TYPE_CHECKING:
    from fedsim.spec import RunSpec

WANDB_DEFAULT_URL = "https://api.wandb.ai"


def wandb_server() -> str:
    """The W&B server this process would log to (`WANDB_BASE_URL`, else wandb.ai)."""
    return os.environ.get("WANDB_BASE_URL") or WANDB_DEFAULT_URL


def has_wandb_key(server: str) -> bool:
    """Whether wandb will find an API key: `WANDB_API_KEY`, or the `~/.netrc` entry that
    `wandb login` writes for the server's host."""
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = host_and_port(server, 443)
    try:
        entries = netrc.netrc(os.environ.get("NETRC")).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return host is not None and host[0] in entries


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

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        """Online mode needs an API key and a server that answers: wandb otherwise fails
        (or retries) only once the run has started."""
        if spec.cfg.logger.get("mode") != "online":
            return
        server = wandb_server()
        fix = "run `wandb login` (or set WANDB_API_KEY), or use logger.mode=offline"
        if not has_wandb_key(server):
            raise ConfigError(f"logger.mode=online needs a W&B API key and none is set; {fix}")
        where = host_and_port(server, 443 if server.startswith("https") else 80)
        problem = "not a URL" if where is None else connect_problem(*where)
        if problem:
            raise ConfigError(f"logger.mode=online cannot reach the W&B server {server} "
                              f"({problem}); use logger.mode=offline and `wandb sync` later")

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


class TensorBoardLogger(NoLogger):
    """TensorBoard event files in `<run dir>/<subdir>`: every metrics.jsonl scalar at its
    round, the resolved config and the summary as text. Open with
    `tensorboard --logdir outputs` (every run under it)."""

    def __init__(self, subdir: str = "tensorboard", flush_secs: int = 30) -> None:
        require(isinstance(subdir, str) and subdir and "/" not in subdir and subdir != "..",
                "logger.subdir", "a folder name inside the run directory", subdir)
        require(isinstance(flush_secs, int) and flush_secs > 0, "logger.flush_secs",
                "an integer > 0", flush_secs)
        self.subdir, self.flush_secs = subdir, flush_secs
        self._writer = None

    def start(self, config: dict[str, Any], run_dir: str, name: str) -> None:
        import json

        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=os.path.join(run_dir, self.subdir),
                                     flush_secs=self.flush_secs)
        self._writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, global_step=step)

    def finish(self, summary: dict[str, Any], failed: bool = False) -> None:
        if self._writer is None:
            return
        shown = {k: v for k, v in summary.items() if isinstance(v, int | float | str)}
        self._writer.add_text("summary", "\n".join(f"- {k}: {v}" for k, v in shown.items()))
        self._writer.close()
        self._writer = None
