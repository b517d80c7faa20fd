"""The default backend: every ClientApp runs in this process, called directly; or, with
`backend.workers` > 1, in a pool of forked worker processes that share the work of each
round; with `backend.batched`, a round's train messages run as one vectorized cohort."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import MessageType
from omegaconf import DictConfig

from fedsim.backends.base import (
    Backend,
    SimulationGrid,
    describe_failure,
    run_client_app,
    server_context,
)
from fedsim.config import to_run_config
from fedsim.errors import RunFailedError, is_int, require

log = logging.getLogger("fedsim")
#: with a pool, a round's sequential messages go out in about this many shards per worker,
#: so a slow client does not hold up a whole worker's share
SHARDS_PER_WORKER = 4
#: why evaluate messages are not batched: they are not meant to be, so it is not logged
ONLY_TRAIN = "only train messages are batched"


@dataclass
class Served:
    """What serving some messages gave: a reply and the node's context after it, per
    message (None where the reply came after the deadline: lost with its state update),
    and why they were not batched when batching was asked and not done."""

    results: list[tuple[Message, Context] | None]
    not_batched: str | None = None


def serve(app: ClientApp, messages: list[Message], contexts: list[Context], batched: bool,
          timeout: float | None) -> Served:
    """Run the ClientApp for each (message, context), as one batched cohort where asked
    and possible, else one after another. Simulated clients run side by side, so
    `timeout` bounds each call: a reply that took longer is lost, with its client's state
    update, as if it never arrived. (A run with `faults.timeout_s` is not batched: a
    cohort has no per-client time.)"""
    not_batched = None
    if batched:
        states = [context.state for context in contexts]
        try:
            not_batched = cohort_problem(app, messages, contexts)
            if not_batched is None:
                return Served(list(zip(app.train_cohort(messages, contexts), contexts,
                                       strict=True)))
        except Exception as err:  # noqa: BLE001 - the sequential path gives each its error
            not_batched = f"the batched cohort failed ({describe_failure(err)})"
            for context, state in zip(contexts, states, strict=True):
                context.state = state
    results: list[tuple[Message, Context] | None] = []
    for msg, context in zip(messages, contexts, strict=True):
        state, start = context.state, time.perf_counter()
        reply = run_client_app(app, msg, context)
        late = timeout is not None and time.perf_counter() - start > timeout
        if late:
            context.state = state
        results.append(None if late else (reply, context))
    return Served(results, not_batched)


def cohort_problem(app: ClientApp, messages: list[Message], contexts: list[Context]
                   ) -> str | None:
    """Why these messages are not trained as one batched cohort (None: they are)."""
    if any(m.metadata.message_type != MessageType.TRAIN for m in messages):
        return ONLY_TRAIN
    problem = getattr(app, "cohort_problem", None)
    return "the ClientApp is not fedsim's" if problem is None else problem(messages, contexts)


_WORKER_APP: ClientApp | None = None


def _start_worker(threads: int) -> None:
    """A pool worker: fedsim's ClientApp (a forked worker has it imported already; a
    spawned one imports it and builds the run's data on its first message), and torch's
    thread count."""
    global _WORKER_APP
    from fedsim.client_app import app

    _WORKER_APP = app
    torch.set_num_threads(threads)


def _serve_in_worker(messages: list[Message], contexts: list[Context], batched: bool,
                     timeout: float | None) -> Served:
    assert _WORKER_APP is not None, "pool worker started without its ClientApp"
    return serve(_WORKER_APP, messages, contexts, batched, timeout)


class InProcessGrid(SimulationGrid):
    """Dispatches each message to the ClientApp in this process, or to a pool of worker
    processes (`pool`), each message with its node's context; the contexts stay here."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict,
                 batched: bool = False, pool: ProcessPoolExecutor | None = None,
                 workers: int = 1) -> None:
        super().__init__(num_nodes, run_config)
        self.client_app = client_app
        self.batched = batched
        self.pool = pool
        self.workers = workers
        self._told: set[str] = set()

    def execute(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        contexts = [self.context(msg.metadata.dst_node_id) for msg in messages]
        if self.pool is None:
            served = [serve(self.client_app, messages, contexts, self.batched, timeout)]
        else:
            shards = self._shards(len(messages))
            futures = [self.pool.submit(_serve_in_worker, messages[a:b], contexts[a:b],
                                        self.batched, timeout) for a, b in shards]
            try:
                served = [future.result() for future in futures]
            except BrokenProcessPool as err:
                raise RunFailedError(
                    "a worker process of backend.workers died (killed by the system, out of "
                    "memory?); the run stops here and can go on with resume=") from err
        replies = []
        for part in served:
            self._tell(part.not_batched)
            for result in part.results:
                if result is not None:
                    reply, context = result
                    self.contexts[context.node_id] = context
                    replies.append(reply)
        return replies

    def _shards(self, count: int) -> list[tuple[int, int]]:
        """Contiguous (start, end) slices: one per worker when batched (each worker's share
        is one cohort), else a few per worker."""
        pieces = self.workers if self.batched else self.workers * SHARDS_PER_WORKER
        size = max(1, -(-count // pieces))
        return [(a, min(a + size, count)) for a in range(0, count, size)]

    def _tell(self, not_batched: str | None) -> None:
        """One log line per reason a round was not batched (evaluations are not meant to be)."""
        if not_batched and not_batched not in self._told and not_batched != ONLY_TRAIN:
            self._told.add(not_batched)
            failed = not_batched.startswith("the batched cohort failed")
            log.log(logging.WARNING if failed else logging.INFO,
                    "backend.batched: training clients one by one: %s", not_batched)


def available_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class InProcessBackend(Backend):
    """Runs the ServerApp against an `InProcessGrid`: no Ray, no polling.

    Parameters
    ----------
    workers : processes that run a round's clients side by side ("auto": one per core;
        1: all in this process). Workers are forked from this one, so they start at
        once with its data and code; results equal the one-process run's.
    batched : train a round's cohort as one vectorized computation where the trainer
        allows it (`Trainer.cohort_problem`: plain SGD and FedProx on a deterministic
        model); elsewhere clients train one by one, with one log line saying why.
    """

    partition_node_ids = True  # node i + 1 holds partition i (attacks rely on it)
    resumable = True  # the server process keeps the nodes' state: it is checkpointed

    def __init__(self, workers: int | str = 1, batched: bool = False) -> None:
        require(workers == "auto" or (is_int(workers) and workers >= 1), "backend.workers",
                "an integer >= 1 or auto (one per CPU core)", workers)
        require(isinstance(batched, bool), "backend.batched", "true or false", batched)
        self.workers = available_cores() if workers == "auto" else int(workers)
        self.batched = batched

    def run(self, cfg: DictConfig) -> None:
        from fedsim.client_app import app as client_app
        from fedsim.server_app import app as server_app

        run_config = to_run_config(cfg)
        pool = self._pool(cfg.torch_threads, cuda=str(cfg.device) != "cpu")
        grid = InProcessGrid(client_app, cfg.num_clients, run_config, self.batched, pool,
                             self.workers)
        try:
            server_app(grid, server_context(run_config))
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    def _pool(self, threads: int, cuda: bool) -> ProcessPoolExecutor | None:
        """Worker processes forked from this one, or spawned where the run may use CUDA
        (`cuda`: its device is not cpu and a GPU is there): the pool forks at its first
        round, after the server has put its model on the GPU, and a forked CUDA context
        does not work. None for one worker."""
        if self.workers == 1:
            return None
        method = "spawn" if torch.cuda.is_available() and cuda else "fork"
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(method),
                                   initializer=_start_worker, initargs=(threads,))
