"""`fedsim`: the Hydra command line.

    fedsim strategy=fedprox dataset=mnist1d partition=dirichlet partition.alpha=0.1
    fedsim -m partition=dirichlet partition.alpha=0.05,0.5,5 seed=0,1,2
    fedsim +experiment=<preset>
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from fedsim.config import CONF_DIR
from fedsim.errors import FedsimError
from fedsim.experiment import run_experiment

log = logging.getLogger("fedsim")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> float | None:
    with open_dict(cfg):
        if cfg.output_dir is None:
            cfg.output_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = run_experiment(cfg)
    except FedsimError as err:
        print(f"fedsim: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    log.info(
        "run finished: final server accuracy %s, outputs in %s",
        summary["final_server_accuracy"], cfg.output_dir,
    )
    return summary["final_server_accuracy"]


def main() -> None:
    """Console-script entry point."""
    _main()
