"""Stale updates on a virtual clock: synchronous-stale and buffered asynchronous FedAvg.

Flower's round loop is synchronous, so staleness is simulated, not waited for.
Every client has a delay (`fedsim.clock.Devices`, config group `devices`):

- `mode: sync` (the staleness-inversion paper's setup): each round samples a
  cohort as FedAvg does; a client with delay d trains on the global model of
  `d` rounds ago (it started then) and its update is applied now.
- `mode: async` (FedBuff; FedAsync with `buffer_size: 1`): `concurrency` clients
  train at once, each from the model current when it started, and finishes
  `1 + delay` time units later. Every `buffer_size` arrivals the server applies
  the buffered updates: one server round = one model version. A finished
  client's slot goes at once to a client drawn from the idle ones, which starts
  from the model current at that moment (the one before the update that the
  arrival completes, unless it is the buffer's last).

A client's training depends only on the model it starts from, so the simulation
runs it when it starts and holds its reply until its virtual arrival time; a
replacement starting in the middle of a round is sent to its node right away.

The server update is `server_lr * sum_i n_i s(tau_i) d_i / sum_i n_i` over the
applied updates `d_i` (uploaded weights minus the model they started from),
with `s` the staleness weighting (`fedsim.clock.staleness_weight`). Subclasses
change a stale update before it is weighted (`correct`): DC-ASGD's first-order
correction, or its conversion by gradient inversion (a converted update reports
`converted` and is weighted as fresh). Every applied update is
logged (`update_log`: round, node, staleness, weight, and what `correct` reports).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from fedsim.clock import WEIGHTINGS, VirtualClock, staleness_weight
from fedsim.errors import ConfigError, require
from fedsim.spec import RunSpec
from fedsim.state import Checkpointed
from fedsim.strategies.base import apply_update, only_arrayrecord, stack_deltas

Arrays = dict[str, np.ndarray]
MODES = ("sync", "async")
#: sync mode, the first `delay` rounds: slow clients fresh (the reference's fixed.py) or
#: already `delay` late, all of them computed on the initial model (fedsim before 2026-12)
STARTUPS = ("reference", "initial")


@dataclass
class Dispatch:
    """A client's local training: which model version it started from, and when."""

    node_id: int
    version: int
    start_time: float


@dataclass
class StaleUpdate:
    """An update to apply: the client's delta from the model it started from (`start`)."""

    dispatch: Dispatch
    delta: Arrays
    content: RecordDict
    start: Arrays


class StaleFedAvg(Checkpointed, FedAvg):
    """FedAvg that applies stale updates, on a virtual clock with simulated device delays.

    Parameters
    ----------
    mode : str
        "sync" (stale but synchronous rounds) or "async" (buffered asynchronous).
    buffer_size : int | None
        async: updates applied per server round (FedBuff's K; 1 = FedAsync).
        Default: half the concurrency.
    concurrency : int | None
        async: clients training at once. Default: the training cohort size.
    server_lr : float
        Scales the aggregated update (FedBuff's eta_g; FedAsync's mixing alpha).
    weighting : str
        Staleness weighting s(tau): constant (direct stale aggregation),
        exponential (2^(-tau / half_life)), polynomial ((1 + tau)^-exponent) or
        hinge; see `fedsim.clock.staleness_weight`.
    mix_models : bool
        Mix the client's *model* into the current one instead of adding its delta:
        each update counts as `w_client - w_t` = `d - (w_t - w_old)` (FedAsync's
        `w <- (1 - a) w + a w_client`).
    startup : str
        sync: what a slow client does before `delay` rounds have passed (`sync_staleness`):
        "reference" trains it on the current model, as the reference code does;
        "initial" makes it `delay` late from round 2 on (computed on the initial model).
    """

    def __init__(
        self,
        mode: str = "sync",
        buffer_size: int | None = None,
        concurrency: int | None = None,
        server_lr: float = 1.0,
        weighting: str = "constant",
        half_life: float = 20.0,
        exponent: float = 0.5,
        hinge_at: float = 10.0,
        mix_models: bool = False,
        startup: str = "reference",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_stale_settings(mode, weighting, server_lr, half_life, exponent, hinge_at, startup)
        self.mode = mode
        self.concurrency = concurrency or self.min_train_nodes
        self.buffer_size = buffer_size or max(1, self.concurrency // 2)
        self.server_lr = float(server_lr)
        self.weighting = weighting
        self.half_life = float(half_life)
        self.exponent = float(exponent)
        self.hinge_at = float(hinge_at)
        self.mix_models = mix_models
        self.startup = startup
        self.delays: dict[int, float] = {}
        self.slow_classes: list[int] = []
        self.clock = VirtualClock()
        self.versions: dict[int, ArrayRecord] = {}
        self.in_flight: dict[int, Dispatch] = {}
        self.update_log: list[dict[str, Any]] = []
        self._grid: Grid | None = None
        self._config = ConfigRecord()
        self._sent: list[int] = []

    applies_late_updates = True  # what a delaying `devices` model asks of the strategy

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        """Simulated nodes (delays are given by partition), a concurrency the run has, and
        in async mode one reply per buffer slot (`faults.min_replies=1`)."""
        cfg = spec.cfg
        require(getattr(get_class(cfg.backend._target_), "partition_node_ids", False),
                "backend", "inprocess or ray for simulated delays (node i + 1 holds "
                "partition i)", str(cfg.backend._target_))
        strategy = cfg.strategy
        concurrency = strategy.get("concurrency")
        concurrency = cfg.clients_per_round if concurrency is None else concurrency
        require(type(concurrency) is int and 1 <= concurrency <= cfg.num_clients,
                "strategy.concurrency", f"an integer in [1, num_clients={cfg.num_clients}] or "
                "null", strategy.get("concurrency"))
        buffer_size = strategy.get("buffer_size")
        if buffer_size is not None:
            require(type(buffer_size) is int and 1 <= buffer_size <= concurrency,
                    "strategy.buffer_size", f"an integer in [1, concurrency={concurrency}] or "
                    "null", buffer_size)
        require(strategy.get("mode") != "async" or cfg.faults.min_replies == 1,
                "faults.min_replies", "1 with strategy.mode=async (an asynchronous server "
                "applies updates one buffer at a time; strategy.buffer_size sets how many)",
                cfg.faults.min_replies)

    def bind_run(self, cfg: DictConfig, data: Any) -> None:
        """Give every node its delay: node `i + 1` holds partition `i`, as in simulation."""
        devices = instantiate(cfg.devices)
        delays = devices.delays(data.label_counts(), cfg.seed)
        self.delays = {i + 1: float(d) for i, d in enumerate(delays)}
        self.slow_classes = devices.slow_classes()

    # ---- dispatch -------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Start clients: a cohort per round (sync), or the free slots (async)."""
        self.versions[server_round] = arrays
        self._grid, self._config = grid, config
        if self.mode == "sync":
            self.clock.advance(float(server_round))
            cohort = super().configure_train(server_round, arrays, config, grid)
            dispatches = [self._sync_dispatch(m.metadata.dst_node_id, server_round)
                          for m in cohort]
        else:
            dispatches = self._start_idle(self.concurrency - len(self.in_flight), server_round)
        self._forget_unused_versions(server_round, dispatches)
        self._sent = [dispatch.node_id for dispatch in dispatches]
        return [self._message(dispatch) for dispatch in dispatches]

    def _start_idle(self, count: int, version: int) -> list[Dispatch]:
        """Draw `count` idle nodes; they start now from model `version`."""
        idle = [n for n in self._grid.get_node_ids() if n not in self.in_flight]
        nodes = random.sample(idle, min(count, len(idle)))
        dispatches = [Dispatch(n, version, self.clock.now) for n in nodes]
        for dispatch in dispatches:
            self.in_flight[dispatch.node_id] = dispatch
        return dispatches

    def _message(self, dispatch: Dispatch) -> Message:
        config = ConfigRecord(dict(self._config))
        config["server-round"] = dispatch.version
        content = RecordDict({self.arrayrecord_key: self.versions[dispatch.version],
                              self.configrecord_key: config})
        return Message(content=content, message_type=MessageType.TRAIN,
                       dst_node_id=dispatch.node_id)

    def _sync_dispatch(self, node_id: int, server_round: int) -> Dispatch:
        """A slow client sampled now started `delay` rounds ago (see `sync_staleness`)."""
        staleness = sync_staleness(whole_rounds(self.delays.get(node_id, 0.0)), server_round,
                                   self.startup)
        version = server_round - staleness
        dispatch = Dispatch(node_id, version, float(version))
        self.in_flight[node_id] = dispatch
        return dispatch

    def _forget_unused_versions(self, server_round: int, dispatches: list[Dispatch]) -> None:
        """Keep only the global models an update may still be read against."""
        needed = {server_round} | {d.version for d in dispatches}
        needed |= {d.version for d in self.in_flight.values()}
        if self.mode == "sync":  # the next rounds' slow clients start up to max-delay back
            horizon = whole_rounds(max(self.delays.values(), default=0.0))
            needed |= set(range(max(1, server_round - horizon + 1), server_round + 1))
        for version in [v for v in self.versions if v not in needed]:
            del self.versions[version]

    # ---- arrival and aggregation ------------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Apply the updates arriving this round: corrected, weighted, example-weighted mean."""
        replies = list(replies)
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        self._free_unanswered(self._sent, valid)
        arrived = self._arrivals(server_round, valid)
        if not arrived:
            return None, None
        current = self._numpy(server_round)
        weighted_sum = {key: np.zeros(value.shape, np.float64) for key, value in current.items()}
        total_examples = 0.0
        infos: list[dict[str, float]] = []
        for update in arrived:
            staleness = server_round - update.dispatch.version
            delta, info = update.delta, {}
            if staleness > 0:
                delta, info = self.correct(update, current, staleness)
            # a converted update is a fresh one: weighted as staleness 0
            effective = 0 if info.get("converted") else staleness
            weight = staleness_weight(effective, self.weighting, self.half_life,
                                      self.exponent, self.hinge_at)
            if self.mix_models:
                delta = model_mixing_delta(delta, update.start, current)
            examples = float(next(iter(update.content.metric_records.values()))[
                self.weighted_by_key])
            for key in weighted_sum:
                weighted_sum[key] += (examples * weight) * delta[key]
            total_examples += examples
            infos.append({"staleness": staleness, **info})
            self.update_log.append({
                "round": server_round, "node": update.dispatch.node_id, "staleness": staleness,
                "weight": weight, "time": self.clock.now, **info,
            })
        scale = self.server_lr / max(total_examples, 1e-12)
        new_arrays = apply_update(current, {k: v * scale for k, v in weighted_sum.items()})
        metrics = self.train_metrics_aggr_fn([u.content for u in arrived], self.weighted_by_key)
        for key, value in summarize_updates(infos, self.clock.now).items():
            metrics[key] = value
        return new_arrays, metrics

    def _arrivals(self, server_round: int, valid: list[Message]) -> list[StaleUpdate]:
        """The updates the server applies this round, in a backend-independent order.

        async: the next `buffer_size` arrivals on the clock; each arrival but the
        last frees a slot that a new client takes at once, from this round's model.
        """
        updates = [self._update_of(msg) for msg in valid]
        if self.mode == "sync":
            for update in updates:
                self.in_flight.pop(update.dispatch.node_id, None)
            return sorted(updates, key=lambda u: u.dispatch.node_id)
        self._schedule(updates)
        buffer: list[StaleUpdate] = []
        while len(buffer) < self.buffer_size and len(self.clock):
            update = self.clock.pop(1)[0].payload
            self.in_flight.pop(update.dispatch.node_id, None)
            buffer.append(update)
            if len(buffer) < self.buffer_size:
                self._start_now(server_round)
        return buffer

    def _schedule(self, updates: list[StaleUpdate]) -> None:
        """Hold each reply until its arrival: start time + 1 + the node's delay."""
        for update in sorted(updates, key=lambda u: u.dispatch.node_id):
            duration = 1.0 + self.delays.get(update.dispatch.node_id, 0.0)
            wait = update.dispatch.start_time + duration - self.clock.now
            self.clock.schedule(update.dispatch.node_id, wait, update)

    def _start_now(self, server_round: int) -> None:
        """Fill a slot freed mid-round: train an idle node now and hold its reply."""
        messages = [self._message(d) for d in self._start_idle(1, server_round)]
        if not messages:
            return
        replies = list(self._grid.send_and_receive(messages))
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        self._free_unanswered([m.metadata.dst_node_id for m in messages], valid)
        self._schedule([self._update_of(msg) for msg in valid])

    def _free_unanswered(self, sent: list[int], valid: list[Message]) -> None:
        """A client that failed or never replied frees its slot (refilled at the next round)."""
        answered = {msg.metadata.src_node_id for msg in valid}
        for node_id in sent:
            if node_id not in answered:
                self.in_flight.pop(node_id, None)

    def _update_of(self, msg: Message) -> StaleUpdate:
        node_id = msg.metadata.src_node_id
        dispatch = self.in_flight[node_id]
        start = self._numpy(dispatch.version)
        upload = stack_deltas([(node_id, only_arrayrecord(msg))], start)
        delta = {key: upload[key][0] - start[key] for key in start}
        return StaleUpdate(dispatch, delta, msg.content, start)

    def _numpy(self, version: int) -> Arrays:
        return {key: array.numpy() for key, array in self.versions[version].items()}

    def correct(
        self, update: StaleUpdate, current: Arrays, staleness: int
    ) -> tuple[Arrays, dict[str, float]]:
        """The delta to apply in place of a stale one, and scalars to log (here: unchanged)."""
        return update.delta, {}


def model_mixing_delta(delta: Arrays, start: Arrays, current: Arrays) -> Arrays:
    """`(w_old + d) - w_t`: the client's model relative to the current global model."""
    return {key: delta[key] + start[key].astype(np.float64) - current[key] for key in delta}


def whole_rounds(delay: float) -> int:
    """A delay in whole rounds, halves rounded up (synchronous mode)."""
    return int(np.floor(delay + 0.5))


def sync_staleness(delay_rounds: int, server_round: int, startup: str = "reference") -> int:
    """How many rounds late a client `delay_rounds` slow is in synchronous round `server_round`.

    From round `delay_rounds + 1` on, both rules make it `delay_rounds` late. Before
    that, "reference" keeps it fresh (the reference's slow clients train on the
    current model until `delay` models of history exist), and "initial" makes it as
    late as the run allows, so every slow update of rounds 2 to `delay_rounds + 1`
    is computed on the initial model.
    """
    if startup == "initial":
        return min(delay_rounds, server_round - 1)
    return delay_rounds if server_round > delay_rounds else 0


def summarize_updates(infos: list[dict[str, float]], now: float) -> dict[str, float]:
    """Round metrics of the applied updates: staleness mean/max, stale count, the
    mean of every other logged scalar over the stale updates, and the virtual time."""
    staleness = [info["staleness"] for info in infos]
    stale = [info for info in infos if info["staleness"] > 0]
    out = {
        "updates": float(len(infos)),
        "stale-updates": float(len(stale)),
        "staleness-mean": float(np.mean(staleness)),
        "staleness-max": float(np.max(staleness)),
        "virtual-time": float(now),
    }
    keys = sorted({key for info in stale for key in info if key != "staleness"})
    for key in keys:
        values = [info[key] for info in stale if key in info]
        out[f"{key}-mean"] = float(np.mean(values))
    return out


def check_stale_settings(
    mode: str,
    weighting: str,
    server_lr: float,
    half_life: float,
    exponent: float,
    hinge_at: float = 0.0,
    startup: str = "reference",
) -> None:
    """One named error for a stale-aggregation setting out of range."""
    if mode not in MODES:
        raise ConfigError(f"strategy.mode must be one of {MODES} (got {mode!r})")
    if startup not in STARTUPS:
        raise ConfigError(f"strategy.startup must be one of {STARTUPS} (got {startup!r})")
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"strategy.weighting must be one of {WEIGHTINGS} (got {weighting!r})")
    for name, value in (("server_lr", server_lr), ("half_life", half_life),
                        ("exponent", exponent)):
        if not (isinstance(value, int | float) and value > 0):
            raise ConfigError(f"strategy.{name} must be a number > 0 (got {value!r})")
    if not (isinstance(hinge_at, int | float) and hinge_at >= 0):
        raise ConfigError(f"strategy.hinge_at must be a number >= 0 (got {hinge_at!r})")
