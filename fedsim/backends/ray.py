"""Clients on a pool of persistent Ray actors.

Each actor builds the ClientApp and receives the federated data once (through
Ray's object store), then serves a batch of messages per round. Node contexts
stay with the grid in the driver and travel with their messages, so any actor
can serve any node and a lost actor loses no client state.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import warnings
from typing import Any

import ray
from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode
from omegaconf import DictConfig

from fedsim.backends.base import SimulationGrid, server_context
from fedsim.config import to_run_config
from fedsim.errors import ConfigError


@ray.remote
class ClientWorker:
    """Runs the fedsim ClientApp for batches of (message, context) pairs."""

    def __init__(self, run_config: dict, data: Any) -> None:
        from fedsim.config import from_run_config
        from fedsim.datasets.federated import prime_cache

        if not ray.get_gpu_ids():  # device=auto must not pick a GPU Ray did not assign
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        prime_cache(from_run_config(run_config), data)

    def execute(
        self, messages: list[Message], contexts: list[Context]
    ) -> list[tuple[Message, Context]]:
        from fedsim.backends.base import run_client_app
        from fedsim.client_app import app

        return [(run_client_app(app, m, c), c) for m, c in zip(messages, contexts, strict=True)]


class RayGrid(SimulationGrid):
    """Spreads each round's messages evenly over the actors, one remote call per actor."""

    def __init__(self, workers: list, num_nodes: int, run_config: dict) -> None:
        super().__init__(num_nodes, run_config)
        self.workers = workers

    def execute(self, messages: list[Message]) -> list[Message]:
        chunks = [messages[i :: len(self.workers)] for i in range(len(self.workers))]
        calls = [
            (chunk, worker.execute.remote(
                chunk, [self.context(m.metadata.dst_node_id) for m in chunk]
            ))
            for worker, chunk in zip(self.workers, chunks, strict=True)
            if chunk
        ]
        replies = []
        for chunk, call in calls:
            try:
                results = ray.get(call)
            except ray.exceptions.RayError as err:
                replies += [_worker_failed(m, err) for m in chunk]
                continue
            for reply, context in results:
                self.contexts[context.node_id] = context
                replies.append(reply)
        return replies


def _worker_failed(message: Message, err: Exception) -> Message:
    return Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"Ray worker failed: {err!r}"),
        reply_to=message,
    )


class RayBackend:
    """Runs the ServerApp in this process against a `RayGrid`.

    Ray is started on first use and kept for the rest of the process (a Hydra
    sweep pays its start-up once); the actors of a run are removed when it ends.

    Parameters
    ----------
    num_cpus, num_gpus : resources reserved per client actor.
    num_actors : actors in the pool (default: the cluster's CPUs // num_cpus, at most
        clients_per_round).
    address : an existing Ray cluster to join; None starts a local one.
    """

    partition_node_ids = True  # node i + 1 holds partition i (attacks rely on it)

    def __init__(
        self,
        num_cpus: float = 1,
        num_gpus: float = 0.0,
        num_actors: int | None = None,
        address: str | None = None,
    ) -> None:
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.num_actors = num_actors
        self.address = address

    def run(self, cfg: DictConfig) -> None:
        from fedsim.datasets.federated import build_federated_data
        from fedsim.server_app import app as server_app

        self._connect()
        pool_size = self._pool_size(cfg)
        self._check_resources(pool_size)
        run_config = to_run_config(cfg)
        data = build_federated_data(cfg)
        shared = ray.put(dataclasses.replace(data, partitioner=None))
        workers = [
            ClientWorker.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus).remote(
                run_config, shared
            )
            for _ in range(pool_size)
        ]
        try:
            server_app(RayGrid(workers, cfg.num_clients, run_config), server_context(run_config))
        finally:
            for worker in workers:
                ray.kill(worker)

    def _connect(self) -> None:
        """Start (or join) Ray once per process; later runs of a sweep reuse the session."""
        if ray.is_initialized():
            return
        warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")
        ray.init(
            address=self.address, include_dashboard=False, logging_level="WARNING",
            log_to_driver=True, configure_logging=False,
        )
        atexit.register(ray.shutdown)

    def _check_resources(self, pool_size: int) -> None:
        """Refuse a pool the cluster cannot place (Ray would wait for it forever)."""
        have = ray.cluster_resources()
        for name, per_actor, field in (("CPU", self.num_cpus, "backend.num_cpus"),
                                       ("GPU", self.num_gpus, "backend.num_gpus")):
            need = pool_size * per_actor
            if need > have.get(name, 0) + 1e-9:
                raise ConfigError(
                    f"{field}={per_actor} x {pool_size} actors needs {need:g} {name}s but the "
                    f"Ray cluster has {have.get(name, 0):g}; lower {field} or backend.num_actors"
                )

    def _pool_size(self, cfg: DictConfig) -> int:
        if self.num_actors:
            return int(self.num_actors)
        cpus = ray.cluster_resources().get("CPU", 1)
        return max(1, min(cfg.clients_per_round, int(cpus // max(self.num_cpus, 1e-9))))
