"""Run and sweep plots, built from small synthetic metrics (no training)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from fedsim.config import compose, validate
from fedsim.errors import ConfigError
from fedsim.plots import (
    curves_figure,
    label_distribution_figure,
    metrics_figure,
    plot_metrics,
    plt,
    run_title,
    select_metrics,
)
from fedsim.report import report_figure, seeds_note


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _cfg(**dataset: str) -> DictConfig:
    return OmegaConf.create({
        "strategy": {"_target_": "flwr.serverapp.strategy.FedAvg"},
        "dataset": {"_target_": "fedsim.datasets.mnist1d.load", **dataset},
        "seed": 3,
    })


def _rows(num_rounds: int = 3) -> list[dict]:
    """metrics.jsonl rows: round 0 has the server's evaluation only."""
    rows = [{"round": 0, "server/accuracy": 0.1, "server/loss": 2.3}]
    for r in range(1, num_rounds + 1):
        rows.append({
            "round": r, "train/train_loss": 2.0 / r, "server/accuracy": 0.2 * r,
            "server/loss": 2.0 / r, "client_eval/accuracy": 0.25 * r, "client_eval/loss": 1 / r,
            "server/accuracy-class-5": 0.1 * r, "server/accuracy-class-10": 0.05 * r,
            "server/accuracy-tail": None if r == 1 else 0.01 * r,
        })
    return rows


def _whole_ticks(fig: Figure, ax) -> list[float]:
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    return [t for t in ax.get_xticks() if lo <= t <= hi]


def test_run_title_names_strategy_dataset_and_seed():
    assert run_title(_cfg()) == "FedAvg on mnist1d, seed 3"
    assert run_title(_cfg(repo="uoft-cs/cifar10")).startswith("FedAvg on cifar10,")
    assert "on clinic," in run_title(_cfg(path="/data/clinic.npz"))


def test_curves_have_the_run_title_and_whole_round_ticks():
    fig = curves_figure(_rows(), run_title(_cfg()))
    title = fig.get_suptitle()
    assert "FedAvg" in title and "mnist1d" in title and "seed 3" in title
    for ax in fig.axes:
        ticks = _whole_ticks(fig, ax)
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert len(fig.axes[0].lines) == 2 and len(fig.axes[1].lines) == 3


def _partitioner(num_clients: int):
    from datasets import ClassLabel, Dataset, Features
    from flwr_datasets.partitioner import IidPartitioner

    partitioner = IidPartitioner(num_partitions=num_clients)
    partitioner.dataset = Dataset.from_dict(
        {"label": [i % 4 for i in range(20 * num_clients)]},
        features=Features({"label": ClassLabel(num_classes=4)}))
    return partitioner


def test_label_heatmap_names_its_axes_and_colorbar():
    fig = label_distribution_figure(_partitioner(12), 12, "FedAvg on mnist1d, seed 3")
    ax, colorbar = fig.axes
    assert ax.get_ylabel() == "class"
    assert "client" in ax.get_xlabel()
    assert colorbar.get_ylabel() == "training samples"
    assert "FedAvg on mnist1d, seed 3" in ax.get_title()


def test_label_bars_name_their_axes():
    fig = label_distribution_figure(_partitioner(4), 4, "FedAvg on mnist1d, seed 3")
    ax = fig.axes[0]
    assert ax.get_ylabel() == "training samples" and "client" in ax.get_xlabel()


def test_listed_metrics_and_patterns_select_recorded_keys():
    keys, unmatched = select_metrics(
        _rows(), ["server/accuracy", "server/accuracy-class-*", "server/accuracy", "nope/*"])
    assert keys == ["server/accuracy", "server/accuracy-class-5", "server/accuracy-class-10"]
    assert unmatched == ["nope/*"]


def test_metrics_plot_has_one_line_per_metric_and_whole_round_ticks():
    keys = ["server/accuracy-class-5", "server/accuracy-tail", "client_eval/accuracy"]
    fig = metrics_figure(_rows(), keys, "FedAvg on mnist1d, seed 3")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == keys
    assert len(ax.lines[1].get_xdata()) == 2  # a None (not evaluated) is no point
    assert "seed 3" in ax.get_title()
    ticks = _whole_ticks(fig, ax)
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_a_metric_never_recorded_is_one_warning_not_a_crash(tmp_path, caplog):
    path = tmp_path / "metrics.png"
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        keys = plot_metrics(_rows(), ["server/accuracy-head", "server/accuracy"], path)
    assert keys == ["server/accuracy"] and path.stat().st_size > 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "server/accuracy-head" in warnings[0].getMessage()
    assert plot_metrics(_rows(), ["nope"], tmp_path / "none.png") == []
    assert not (tmp_path / "none.png").exists()


def _report_rows(counts: list[int]) -> list[dict]:
    return [{"num_clients": str(c), "strategy": "fedavg", "mean": 0.5 + 0.01 * c, "std": 0.02,
             "n": n} for c, n in zip((2, 3, 4, 5), counts, strict=False)]


def test_report_says_what_the_error_bars_are():
    fig = report_figure(["num_clients", "strategy"], _report_rows([3, 3, 3, 3]), "acc")
    ax = fig.axes[0]
    assert "mean ± std over 3 seeds" in ax.get_title()
    ticks = _whole_ticks(fig, ax)
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert seeds_note(_report_rows([2, 3, 3])) == "mean ± std over 2-3 seeds"
    assert seeds_note(_report_rows([1])) == "mean ± std over 1 seed"


def test_report_bars_say_what_the_error_bars_are():
    rows = [{"strategy": s, "mean": 0.5, "std": 0.1, "n": 2} for s in ("fedavg", "fedprox")]
    assert "std over 2 seeds" in report_figure(["strategy"], rows, "acc").axes[0].get_title()


@pytest.mark.parametrize(("experiment", "expected"), [
    ("staleness", "server/accuracy-class-*"),
    ("fedloge_mnist1d", "server/accuracy-tail"),
])
def test_presets_plot_their_metric(experiment, expected):
    cfg = compose([f"+experiment={experiment}"])
    validate(cfg)
    assert expected in cfg.plots.metrics


def test_plot_metrics_default_to_none():
    assert list(compose().plots.metrics) == []


@pytest.mark.parametrize("value", ["server/accuracy", "3", "[1]", "['']"])
def test_bad_plot_metrics_are_refused(value):
    with pytest.raises(ConfigError) as err:
        validate(compose([f"plots.metrics={value}"]))
    assert str(err.value).startswith("plots.metrics must be") and "\n" not in str(err.value)


@pytest.mark.parametrize("value", ["3", "maybe", "[]", "null"])
def test_a_bad_plots_enabled_is_refused(value):
    with pytest.raises(ConfigError) as err:
        validate(compose([f"plots.enabled={value}"]))
    assert str(err.value).startswith("plots.enabled must be true or false")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", ["null", "3"])
def test_a_section_set_to_a_value_is_one_line(value):
    with pytest.raises(ConfigError) as err:
        validate(compose([f"plots={value}"]))
    assert str(err.value).startswith("plots must be a section of settings (enabled, metrics)")
    assert "\n" not in str(err.value)


def test_turning_plots_off_on_resume_keeps_the_stored_plot_metrics(tmp_path: Path):
    from fedsim.checkpoint import CONFIG_FILE, resumed_config

    OmegaConf.save(compose(["+experiment=fedloge_mnist1d"]), tmp_path / CONFIG_FILE, resolve=True)
    cfg = resumed_config(str(tmp_path), ["plots.enabled=false", "backend=ray",
                                         "backend.num_actors=1"])
    assert cfg.plots.enabled is False
    assert list(cfg.plots.metrics) == list(compose(["+experiment=fedloge_mnist1d"]).plots.metrics)
    assert cfg.backend._target_.endswith("RayBackend") and cfg.backend.num_actors == 1


def test_plot_metrics_may_change_on_resume(tmp_path: Path):
    from fedsim.checkpoint import CONFIG_FILE, resumed_config

    OmegaConf.save(compose(), tmp_path / CONFIG_FILE, resolve=True)
    cfg = resumed_config(str(tmp_path), ["plots.metrics=[server/loss]"])
    assert list(cfg.plots.metrics) == ["server/loss"]


def test_the_client_app_imports_no_matplotlib():
    """Each deployed message starts a ClientApp process; matplotlib (~1 s to import) is
    loaded only when a run draws a plot."""
    probe = "import sys, fedsim.client_app; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
