"""The default backend: every ClientApp runs in this process, called directly."""

from __future__ import annotations

import time

from flwr.app import Message
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

from fedsim.backends.base import Backend, SimulationGrid, run_client_app, server_context
from fedsim.config import to_run_config


class InProcessGrid(SimulationGrid):
    """Dispatches each message to the ClientApp in this process, one after another."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict) -> None:
        super().__init__(num_nodes, run_config)
        self.client_app = client_app

    def execute(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        """One message after another. Simulated clients run side by side, so `timeout`
        bounds each call: a reply that took longer is lost, with its client's state
        update, as if it never arrived."""
        replies = []
        for msg in messages:
            context = self.context(msg.metadata.dst_node_id)
            state, start = context.state, time.perf_counter()
            reply = run_client_app(self.client_app, msg, context)
            if timeout is not None and time.perf_counter() - start > timeout:
                context.state = state
                continue
            replies.append(reply)
        return replies


class InProcessBackend(Backend):
    """Runs the ServerApp against an `InProcessGrid`: no Ray, no polling, no copies."""

    partition_node_ids = True  # node i + 1 holds partition i (attacks rely on it)
    resumable = True  # the server process keeps the nodes' state: it is checkpointed

    def run(self, cfg: DictConfig) -> None:
        from fedsim.client_app import app as client_app
        from fedsim.server_app import app as server_app

        run_config = to_run_config(cfg)
        grid = InProcessGrid(client_app, cfg.num_clients, run_config)
        server_app(grid, server_context(run_config))
