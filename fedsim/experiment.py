"""One run from a composed config: validate, then hand it to the chosen backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from fedsim.config import validate
from fedsim.datasets.federated import build_federated_data
from fedsim.recording import SUMMARY_FILE, default_run_dir, prepare_run_dir
from fedsim.runtime import check_model_fits


def run_experiment(cfg: DictConfig) -> dict[str, Any]:
    """Validate `cfg`, run it on `cfg.backend`, and return the run's summary."""
    validate(cfg)
    if cfg.output_dir is None:
        with open_dict(cfg):
            cfg.output_dir = str(default_run_dir())
    check_model_fits(cfg, build_federated_data(cfg))  # data-dependent checks come first too
    backend = instantiate(cfg.backend)
    prepare_run_dir(cfg.output_dir)
    backend.run(cfg)
    return json.loads((Path(cfg.output_dir) / SUMMARY_FILE).read_text())
