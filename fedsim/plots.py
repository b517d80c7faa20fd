"""PNG plots written into every run directory."""

from __future__ import annotations

import logging
import multiprocessing
import re
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

MAX_PLOTTED_CLIENTS = 50
BACKGROUND_PLOT_TIMEOUT_S = 300  # a plot of 50 clients takes about a second
BAR_PLOT_MAX_CLIENTS = 10  # more clients: a heatmap (bars cost ~1 s for 100 clients)
CLIENT_AXIS = "client (partition)"
SAMPLES = "training samples"
LINE_STYLES = ("-", "--", ":", "-.")  # one per metric source (server/, client_eval/, ...)
log = logging.getLogger("fedsim")


def _short(target: Any) -> str:
    """`FedAvg` for `flwr.serverapp.strategy.FedAvg`."""
    return str(target).rsplit(".", 1)[-1]


def dataset_name(dataset: Mapping[str, Any]) -> str:
    """A readable dataset name: the Hugging Face repo's (`cifar10`), the file's stem (npz),
    else the loader's module (`mnist1d` for `fedsim.datasets.mnist1d.load`)."""
    if dataset.get("repo"):
        return str(dataset["repo"]).rsplit("/", 1)[-1]
    if dataset.get("path"):
        return Path(str(dataset["path"])).stem
    parts = str(dataset.get("_target_", "?")).split(".")
    return parts[-2] if len(parts) > 1 else parts[0]


def run_title(cfg: Mapping[str, Any]) -> str:
    """`FedAvg on mnist1d, seed 0`: the strategy's class, the dataset and the seed."""
    return (f"{_short(cfg['strategy']['_target_'])} on {dataset_name(cfg['dataset'])}, "
            f"seed {cfg['seed']}")


def integer_rounds(ax: Axes) -> None:
    """Whole-number ticks on the x axis (rounds)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Figure, path: Path, **kwargs: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, **kwargs)
    plt.close(fig)


def label_distribution_figure(partitioner: Any, num_clients: int, title: str) -> Figure:
    """Per-client label counts (flwr-datasets' plot), first 50 clients at most: bars up to
    10 clients (one colour per class), else a class x client heatmap."""
    from flwr_datasets.visualization import plot_label_distributions

    shown = min(num_clients, MAX_PLOTTED_CLIENTS)
    heatmap = shown > BAR_PLOT_MAX_CLIENTS
    fig, ax, _ = plot_label_distributions(
        partitioner,
        label_name="label",
        plot_type="heatmap" if heatmap else "bar",
        size_unit="absolute",
        max_num_partitions=shown,
        legend=True,
        legend_title=SAMPLES if heatmap else "class",
        title=f"{title}\ntraining labels per client"
              + (f" (first {shown} of {num_clients})" if shown < num_clients else ""),
    )
    ax.set_xlabel(CLIENT_AXIS)
    ax.set_ylabel("class" if heatmap else SAMPLES)
    return fig


def plot_label_distribution(partitioner: Any, path: Path, num_clients: int,
                            title: str = "") -> None:
    """`label_distribution_figure` saved to `path`."""
    _save(label_distribution_figure(partitioner, num_clients, title), path,
          bbox_inches="tight")


class Background:
    """A plot drawn in a forked process while the run goes on (the label-distribution plot
    was most of a small run's fixed cost); `wait` joins it. Where fork is not available
    the plot is drawn at once, in this process."""

    def __init__(self, draw: Callable[..., None], *args: Any) -> None:
        self.what = getattr(draw, "__name__", "plot")
        self.process = None
        if "fork" not in multiprocessing.get_all_start_methods():
            draw(*args)
            return
        self.process = multiprocessing.get_context("fork").Process(
            target=draw, args=args, daemon=True)
        self.process.start()

    def wait(self) -> None:
        """Return once the plot is written; a failed one is logged, not raised (a plot
        must not fail a finished run)."""
        if self.process is None:
            return
        self.process.join(BACKGROUND_PLOT_TIMEOUT_S)
        if self.process.exitcode is None:  # stuck, e.g. on a lock a thread held at the fork
            self.process.kill()
            self.process.join()
            log.warning("%s took over %d s in its process and was stopped", self.what,
                        BACKGROUND_PLOT_TIMEOUT_S)
        elif self.process.exitcode != 0:
            log.warning("%s failed in its process (exit code %s)", self.what,
                        self.process.exitcode)
        self.process = None


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> list[tuple[Any, Any]]:
    return [(r["round"], r[key]) for r in rows if r.get(key) is not None]


def curves_figure(rows: Sequence[Mapping[str, Any]], title: str) -> Figure:
    """Accuracy and loss over rounds: server test split, client evaluation, training."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, lines in (
        (ax_acc, (("server/accuracy", "server test"), ("client_eval/accuracy", "clients"))),
        (ax_loss, (("server/loss", "server test"), ("client_eval/loss", "clients"),
                   ("train/train_loss", "train"))),
    ):
        for key, label in lines:
            points = _series(rows, key)
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=label)
    for ax, name in ((ax_acc, "accuracy"), (ax_loss, "loss")):
        _round_axes(ax, name)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> None:
    """`curves_figure` saved to `path`."""
    _save(curves_figure(rows, title), path)


def _round_axes(ax: Axes, ylabel: str) -> None:
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    integer_rounds(ax)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")


def _natural(key: str) -> list[Any]:
    """Sort key with numbers compared as numbers (`class-10` after `class-9`)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def select_metrics(rows: Sequence[Mapping[str, Any]],
                   patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """The metrics.jsonl keys that `patterns` (keys or shell-style patterns such as
    `server/accuracy-class-*`) name, in pattern order; and the patterns that name none."""
    present = sorted({k for r in rows for k, v in r.items() if v is not None and k != "round"},
                     key=_natural)
    keys: list[str] = []
    unmatched: list[str] = []
    for pattern in patterns:
        found = [k for k in present if fnmatchcase(k, pattern)]
        keys.extend(k for k in found if k not in keys)
        if not found:
            unmatched.append(pattern)
    return keys, unmatched


def metrics_figure(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], title: str) -> Figure:
    """One line per key over rounds: the colour follows the metric (`accuracy-tail`), the
    line style its source (`server/`, `client_eval/`)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    colors: dict[str, str] = {}
    styles: dict[str, str] = {}
    for key in keys:
        source, _, metric = key.rpartition("/")
        color = colors.setdefault(metric, f"C{len(colors) % 10}")
        style = styles.setdefault(source, LINE_STYLES[len(styles) % len(LINE_STYLES)])
        ax.plot(*zip(*_series(rows, key), strict=True), marker=".", color=color,
                linestyle=style, label=key)
    _round_axes(ax, "value")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_metrics(rows: Sequence[Mapping[str, Any]], patterns: Sequence[str], path: Path,
                 title: str = "") -> list[str]:
    """The metrics `plots.metrics` lists, saved to `path` (nothing when none was recorded);
    one warning line for the patterns no row has. Returns the plotted keys."""
    keys, unmatched = select_metrics(rows, patterns)
    if unmatched:
        log.warning("plots.metrics: no metric in metrics.jsonl matches %s (not plotted)",
                    ", ".join(unmatched))
    if keys:
        _save(metrics_figure(rows, keys, title), path)
    return keys
