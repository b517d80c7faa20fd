"""Clients on a pool of persistent Ray actors.

Each actor builds the ClientApp and receives the federated data once (through
Ray's object store), then serves its share of each round's messages in one remote
call (per-message calls cost about 1 ms each in Ray's task path, as much as a small
client's training). Node contexts stay with the grid in the driver and travel with
their messages, so any actor can serve any node, and a lost actor (replaced by a new
one) loses no client state: only the replies it owed that round. Actors are spread
over the cluster's nodes; the grid counts the replies each Ray node served.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import signal
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import ray
from flwr.app import Context, Error, Message
from flwr.common import MessageType
from flwr.common.constant import ErrorCode
from omegaconf import DictConfig

from fedsim.backends.base import Backend, SimulationGrid, check_resources, server_context
from fedsim.config import to_run_config
from fedsim.errors import ConfigError, is_int, require
from fedsim.reachability import connect_problem, host_and_port
from fedsim.spec import RunSpec

RAY_GCS_PORT = 6379  # `ray start --head` listens here; ray:// clients on 10001
RAY_CLIENT_PORT = 10001
SALVAGE_S = 5.0  # how long a late actor may take to hand over the replies it finished
log = logging.getLogger("fedsim")

#: (index of the message in the round, message, its node's context)
Job = tuple[int, Message, Context]
#: (index of the message in the round, reply, the node's context after it)
Done = tuple[int, Message, Context]


@ray.remote
class ClientWorker:
    """Runs the fedsim ClientApp for a share of a round's (message, context) pairs.

    Created with `max_concurrency=2`: one thread serves `execute`, the other can answer
    `finished` while it is still busy, so a round's deadline keeps the replies that an
    actor stuck on a late client had already finished.
    """

    def __init__(self) -> None:
        if not ray.get_gpu_ids():  # device=auto must not pick a GPU Ray did not assign
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        # The process's start-up, paid once and before `setup` answers: the ClientApp's
        # imports and torch._dynamo, which torch.optim imports on the first optimizer a
        # process builds (1-3 s on a 2-core machine). A replacement actor's first call must
        # not spend them against the round's deadline, or it is late again and replaced
        # again, round after round.
        import torch._dynamo  # noqa: F401

        from fedsim.client_app import app

        self.app = app
        self.node_id = ray.get_runtime_context().get_node_id()
        self.done: list[Done] = []

    def setup(self, run_config: dict, data: Any) -> str:
        """Take a run's data (from the object store) and build its client runtime (model,
        trainer); answers with the Ray node this actor runs on."""
        from fedsim.config import from_run_config
        from fedsim.datasets.federated import prime_cache
        from fedsim.runtime import client_runtime

        cfg = from_run_config(run_config)
        prime_cache(cfg, data)
        client_runtime(cfg)
        return self.node_id

    def execute(self, jobs: list[Job], die_at: int | None = None) -> list[Done]:
        """The ClientApp's reply to each message and the node's context after it, in order.
        At the message numbered `die_at` this worker process ends first
        (`faults.kill_worker_round`): the call fails, the grid replaces the actor."""
        from fedsim.backends.base import run_client_app

        self.done = done = []
        for index, message, context in jobs:
            if index == die_at:
                os._exit(1)
            done.append((index, run_client_app(self.app, message, context), context))
        return done

    def finished(self) -> list[Done]:
        """What the running `execute` has finished so far (asked when it is late)."""
        return list(self.done)


class RayGrid(SimulationGrid):
    """Hands each actor its share of a round's messages, in one remote call.

    Message i goes to actor i % pool size. With `timeout`, the replies not finished
    by then are lost, and every actor still busy is killed and a new one takes its
    place (after handing over the replies it did finish), as is one that died
    (`new_worker` builds it). `kill_round`: the worker serving the round's lowest node
    dies (`faults.kill_worker_round`), as one lost to the OS would: the replies it
    owed that round are errors. The pool's first start-up is awaited by the first
    round, off its deadline, so that it overlaps the server's own set-up.
    """

    def __init__(self, new_worker: Callable[[], Any], workers: list[Any], num_nodes: int,
                 run_config: dict, data: Any, kill_round: int | None = None) -> None:
        super().__init__(num_nodes, run_config)
        self.new_worker = new_worker
        self.data = data  # the run's FederatedData in the object store
        self.workers = list(workers)
        self.worker_nodes: list[str] = [""] * len(workers)
        self._starting = self._setup(range(len(workers)))  # awaited by the first round
        self.kill_round = kill_round
        self.served: Counter[str] = Counter()  # replies per Ray node id

    def execute(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        self._await_ready()
        shares = self._shares(messages)
        victim = self._victim(messages)
        calls = {self.workers[slot].execute.remote(jobs, victim): slot
                 for slot, jobs in shares.items()}
        done, late = ray.wait(list(calls), num_returns=len(calls), timeout=timeout)
        late_slots = [calls[ref] for ref in late]
        finished, lost = self._salvage(late_slots), set(late_slots)
        replies: dict[int, Message] = {}
        for ref in done:
            slot = calls[ref]
            try:
                finished[slot] = ray.get(ref)
            except ray.exceptions.RayError as err:
                replies |= {i: _worker_failed(msg, err) for i, msg, _ in shares[slot]}
                lost.add(slot)
        for slot, results in finished.items():
            for index, reply, context in results:
                self.contexts[context.node_id] = context
                replies[index] = reply
            self.served[self.worker_nodes[slot]] += len(results)
        self._replace(sorted(lost))
        return [replies[i] for i in sorted(replies)]

    def _shares(self, messages: list[Message]) -> dict[int, list[Job]]:
        """Each actor's (index, message, context) jobs: message i to actor i % pool size."""
        shares: dict[int, list[Job]] = {}
        for index, msg in enumerate(messages):
            job = (index, msg, self.context(msg.metadata.dst_node_id))
            shares.setdefault(index % len(self.workers), []).append(job)
        return shares

    def _salvage(self, slots: list[int]) -> dict[int, list[Done]]:
        """The replies that late actors finished before the deadline (none from one that
        does not answer within SALVAGE_S)."""
        asks = {self.workers[slot].finished.remote(): slot for slot in slots}
        answered, _ = ray.wait(list(asks), num_returns=len(asks), timeout=SALVAGE_S)
        salvaged = {}
        for ref in answered:
            try:
                salvaged[asks[ref]] = ray.get(ref)
            except ray.exceptions.RayError:
                continue
        return salvaged

    def _setup(self, slots: Iterable[int]) -> dict[int, Any]:
        """Hand the run to the actors in `slots`: their pending `setup` calls."""
        return {slot: self.workers[slot].setup.remote(self.run_config, self.data)
                for slot in slots}

    def _await_ready(self) -> None:
        """Wait for the actors still starting (not on a round's clock); note their nodes."""
        starting, self._starting = self._starting, {}
        for slot, node in zip(starting, ray.get(list(starting.values())), strict=True):
            self.worker_nodes[slot] = node

    def _replace(self, slots: list[int]) -> None:
        """New actors in `slots`, ready before the next call (their start-up must not count
        against the next round's deadline)."""
        for slot in slots:
            ray.kill(self.workers[slot])
            self.workers[slot] = self.new_worker()
        self._starting = self._setup(slots)
        self._await_ready()

    def ray_nodes(self) -> int:
        """How many Ray nodes served at least one reply so far."""
        return sum(1 for count in self.served.values() if count)

    def log_nodes(self) -> None:
        """One line: how many Ray nodes served clients, and how many replies each."""
        if self.served:
            log.info("clients ran on %d Ray node(s): %s", self.ray_nodes(), ", ".join(
                f"{node[:8]} {count} replies" for node, count in sorted(self.served.items())))

    def _victim(self, messages: list[Message]) -> int | None:
        """Index of the message whose worker dies now, if this is the train round
        `kill_round` (the message to the round's lowest node)."""
        train = [(m.metadata.dst_node_id, i) for i, m in enumerate(messages)
                 if m.metadata.message_type == MessageType.TRAIN]
        if self.kill_round is None or not train:
            return None
        config = messages[train[0][1]].content.config_records.get("config", {})
        if config.get("server-round") != self.kill_round:
            return None
        self.kill_round = None  # once
        return min(train)[1]


def _kill(workers: list[Any]) -> None:
    for worker in workers:
        ray.kill(worker)


def _worker_failed(message: Message, err: Exception) -> Message:
    return Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"Ray worker failed: {err!r}"),
        reply_to=message,
    )


class RayBackend(Backend):
    """Runs the ServerApp in this process against a `RayGrid`.

    Ray is started (or joined) on first use and kept for the rest of the process (a
    Hydra sweep pays its start-up once); the actors of a run are removed when it ends,
    as idle actors would hold CPUs that other Ray users (Flower's engine) wait for.
    `address` (or RAY_ADDRESS with address=null) joins a running cluster, so a series of
    processes shares one `ray start --head`.

    Parameters
    ----------
    num_cpus, num_gpus : resources reserved per client actor.
    num_actors : actors in the pool (default: the cluster's CPUs // num_cpus, at most
        clients_per_round).
    address : an existing Ray cluster to join (host:port, ray://host:port or auto); None
        starts a local one unless RAY_ADDRESS names one.
    """

    partition_node_ids = True  # node i + 1 holds partition i (attacks rely on it)
    resumable = True  # the server process keeps the nodes' state: it is checkpointed
    worker_processes = True  # actors, which faults.kill_worker_round may kill

    def __init__(
        self,
        num_cpus: float = 1,
        num_gpus: float = 0.0,
        num_actors: int | None = None,
        address: str | None = None,
    ) -> None:
        check_resources(num_cpus, num_gpus)
        require(num_actors is None or (is_int(num_actors) and num_actors >= 1),
                "backend.num_actors", "an integer >= 1 or null", num_actors)
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.num_actors = num_actors
        self.address = address

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        """An existing cluster (`backend.address`) must answer: Ray itself retries for a
        minute before it fails."""
        address = spec.cfg.backend.get("address")
        if address in (None, "auto", "local"):
            return
        where = host_and_port(str(address), RAY_CLIENT_PORT if str(address).startswith(
            "ray://") else RAY_GCS_PORT)
        problem = "not host:port" if where is None else connect_problem(*where)
        if problem:
            raise ConfigError(
                f"backend.address must be a running Ray cluster's address (host:port, "
                f"ray://host:port or auto), or null to start a local one: cannot reach "
                f"{address!r} ({problem})")

    def run(self, cfg: DictConfig) -> None:
        from fedsim.datasets.federated import build_federated_data
        from fedsim.server_app import app as server_app

        self._connect()
        pool_size = self._pool_size(cfg)
        self._check_resources(pool_size)
        # SPREAD: a multi-node cluster serves clients on every node, not first fills one
        new_worker = ClientWorker.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                          max_concurrency=2, scheduling_strategy="SPREAD").remote
        workers = [new_worker() for _ in range(pool_size)]  # they import meanwhile
        grid = None
        try:
            run_config = to_run_config(cfg)
            data = build_federated_data(cfg)
            shared = ray.put(dataclasses.replace(data, partitioner=None))
            grid = RayGrid(new_worker, workers, cfg.num_clients, run_config, shared,
                           cfg.faults.kill_worker_round)
            server_app(grid, server_context(run_config))
        finally:
            _kill(workers if grid is None else grid.workers)
            if grid is not None:
                grid.log_nodes()

    def _connect(self) -> None:
        """Start (or join) Ray once per process; later runs of a sweep reuse the session."""
        if ray.is_initialized():
            return
        warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")
        own_handler = signal.getsignal(signal.SIGTERM)
        ray.init(
            address=self.address, include_dashboard=False, logging_level="WARNING",
            log_to_driver=True, configure_logging=False,
        )
        # ray.init installs its own SIGTERM handler (exit with a traceback); `kill` must stop
        # the run as the process's own handler does (one line, resume hint)
        if own_handler is not None:
            signal.signal(signal.SIGTERM, own_handler)
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
