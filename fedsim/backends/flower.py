"""Flower's own Ray simulation engine running fedsim's apps.

This is the only module that calls `flwr.simulation.run_simulation` (deprecated
upstream). Flower assigns random node ids, so client sampling differs from the
other backends' unless every client takes part each round.
"""

from __future__ import annotations

import json
import logging
import warnings

from omegaconf import DictConfig

from fedsim.backends.base import Backend, check_resources
from fedsim.config import RUN_CONFIG_KEY, to_run_config


def run_flower_simulation(server_app, client_app, num_supernodes: int, num_cpus: float,
                          num_gpus: float) -> None:
    """`run_simulation` on the Ray backend with the given per-client resources."""
    from flwr.simulation import run_simulation

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_supernodes,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus},
            "init_args": {"logging_level": "WARNING", "log_to_driver": True},
        },
    )


class FlowerSimulationBackend(Backend):
    """fedsim's ServerApp and ClientApp under `flwr.simulation.run_simulation`."""

    def __init__(self, num_cpus: float = 1, num_gpus: float = 0.0) -> None:
        check_resources(num_cpus, num_gpus)
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus

    def run(self, cfg: DictConfig) -> None:
        from fedsim.client_app import make_client_app
        from fedsim.server_app import make_server_app

        warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")
        for name in ("flwr", "alembic"):  # Flower's engine logs its set-up at DEBUG/INFO
            logging.getLogger(name).setLevel(cfg.flwr_log_level)
        config_json = to_run_config(cfg)[RUN_CONFIG_KEY]
        json.loads(config_json)  # fail here, not inside a Ray worker, if it is not JSON
        run_flower_simulation(
            make_server_app(config_json),
            make_client_app(config_json),
            cfg.num_clients,
            self.num_cpus,
            self.num_gpus,
        )
