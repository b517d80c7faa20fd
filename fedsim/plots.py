"""PNG plots written into every run directory."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MAX_PLOTTED_CLIENTS = 50
BAR_PLOT_MAX_CLIENTS = 10  # more clients: a heatmap (bars cost ~1 s for 100 clients)


def plot_label_distribution(partitioner, path: Path, num_clients: int) -> None:
    """Per-client label counts (flwr-datasets' plot), first 50 clients at most."""
    shown = min(num_clients, MAX_PLOTTED_CLIENTS)
    from flwr_datasets.visualization import plot_label_distributions

    fig, _, _ = plot_label_distributions(
        partitioner,
        label_name="label",
        plot_type="bar" if shown <= BAR_PLOT_MAX_CLIENTS else "heatmap",
        size_unit="absolute",
        max_num_partitions=shown,
        legend=True,
        legend_title="class" if shown <= BAR_PLOT_MAX_CLIENTS else "samples",
        title="Training labels per client",
    )
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_curves(rows: list[dict], path: Path) -> None:
    """Accuracy and loss over rounds: server test split, client evaluation, training."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("server/accuracy", "server test"), ("client_eval/accuracy", "clients")):
        points = [(r["round"], r[key]) for r in rows if key in r]
        if points:
            ax_acc.plot(*zip(*points, strict=True), marker=".", label=label)
    for key, label in (
        ("server/loss", "server test"),
        ("client_eval/loss", "clients"),
        ("train/train_loss", "train"),
    ):
        points = [(r["round"], r[key]) for r in rows if key in r]
        if points:
            ax_loss.plot(*zip(*points, strict=True), marker=".", label=label)
    for ax, name in ((ax_acc, "accuracy"), (ax_loss, "loss")):
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
