"""`fedsim`: the Hydra command line.

    fedsim strategy=fedprox dataset=mnist1d partition=dirichlet partition.alpha=0.1
    fedsim -m partition=dirichlet partition.alpha=0.05,0.5,5 seed=0,1,2
    fedsim +experiment=<preset>
    fedsim resume=<run dir>          # go on from the run's last checkpoint
"""

from __future__ import annotations

import logging
import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from fedsim.checkpoint import resumed_config
from fedsim.config import CONF_DIR
from fedsim.errors import FedsimError
from fedsim.experiment import run_experiment

log = logging.getLogger("fedsim")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> float | None:
    signal.signal(signal.SIGTERM, _stop)  # `kill` ends a run as Ctrl-C does: workers stopped
    try:
        if cfg.resume is not None:
            cfg = resumed_config(cfg.resume, HydraConfig.get().overrides.task, cfg)
        with open_dict(cfg):
            if cfg.output_dir is None:
                cfg.output_dir = HydraConfig.get().runtime.output_dir
        summary = run_experiment(cfg)
    except FedsimError as err:
        print(f"fedsim: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    failures = {k: summary.get(k, 0) for k in ("train_failures", "skipped_rounds")}
    log.info(
        "run finished: final server accuracy %s, outputs in %s%s",
        summary["final_server_accuracy"], cfg.output_dir,
        f" ({failures['train_failures']} failed train replies, {failures['skipped_rounds']} "
        "skipped rounds: see the warnings above)" if any(failures.values()) else "",
    )
    return summary["final_server_accuracy"]


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    """Console-script entry point."""
    _main()
