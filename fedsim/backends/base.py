"""The backend interface, grids for simulation, and the byte meter every run's grid is
wrapped in.

A `SimulationGrid` implements Flower's `Grid` for clients that live in (or are
driven from) this process: node `i + 1` holds partition `i`, each node keeps
its `Context` across rounds, and `send_and_receive` returns as soon as the
replies exist instead of polling a message store.
"""

from __future__ import annotations

import logging
import re
import traceback
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from omegaconf import DictConfig

from fedsim.errors import is_number, require
from fedsim.state import Checkpointed

RUN_ID = 1
MAX_LOGGED_FAILURES = 3  # per round; the rest are counted
log = logging.getLogger("fedsim")


class Backend(ABC):
    """Where a run's ServerApp and ClientApps execute (the `backend` config group).

    `run(cfg)` runs the composed, checked config to its end. The class attributes say
    what the engine and the methods may rely on; a new backend keeps the defaults
    unless it simulates its nodes.
    """

    #: node i + 1 holds partition i, driven from this process: attacks, simulated device
    #: delays and resume rely on it
    partition_node_ids: bool = False
    #: the run's outputs are written on another machine (a remote SuperLink)
    outputs_elsewhere: bool = False
    #: clients run in worker processes that `faults.kill_worker_round` may kill
    worker_processes: bool = False
    #: `resume=` may go on with this backend from a checkpoint of fedsim's ServerApp
    resumable: bool = False

    @abstractmethod
    def run(self, cfg: DictConfig) -> None:
        """Run `cfg` to its end; the ServerApp writes the outputs."""


def check_resources(num_cpus: float, num_gpus: float) -> None:
    """Per-client resources of a Ray-based backend: CPUs > 0, GPUs >= 0."""
    require(is_number(num_cpus) and num_cpus > 0, "backend.num_cpus", "a number > 0", num_cpus)
    require(is_number(num_gpus) and num_gpus >= 0, "backend.num_gpus", "a number >= 0", num_gpus)


def content_nbytes(content: RecordDict) -> int:
    """Bytes of array payload in a message's content (what dominates the wire)."""
    return sum(
        len(array.data) for record in content.array_records.values() for array in record.values()
    )


class ClientAppFailed(Exception):  # noqa: N818 - reads as what happened, in Flower's logs
    """A ClientApp raised: the message names the original exception and where it was
    raised, since Flower's engines pass on only `type: message` of what a ClientApp raises."""


def describe_failure(err: BaseException) -> str:
    """`Type: message (at file.py:line in function)`, the raising frame being the last of
    the traceback (one line; the message's first line)."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    frames = traceback.extract_tb(err.__traceback__)
    if frames:
        last = frames[-1]
        text += f" (at {Path(last.filename).name}:{last.lineno} in {last.name})"
    return text


_FLOWER_REASON = re.compile(r"<class '([\w.()]+)'>:<'(.*)'>", re.DOTALL)
_RAISED_LINE = re.compile(r"^\s*(?:[\w]+\.)*(\w*(?:Error|Exception|Failed|Exit|Interrupt))"
                          r"(?:\([^)]*\))?: ?(.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: exceptions that only carry another one (Flower's and Ray's wrappers)
_WRAPPERS = ("ClientAppException", "RayTaskError")


def failure_cause(reason: str, limit: int = 500) -> str:
    """The cause in a failed reply's reason, on one line: the exception and where it was
    raised. Reads Flower's `<class 'T'>:<'message'>` form (its Ray engine wraps a whole
    remote traceback in it), tracebacks, and fedsim's own `describe_failure` lines."""
    text, name = _ANSI.sub("", reason).strip(), ""
    while (match := _FLOWER_REASON.fullmatch(text)) is not None:
        name, text = match.group(1).rsplit(".", 1)[-1], match.group(2).strip()
    raised = [(m.group(1), m.group(2).strip()) for line in text.splitlines()
              if (m := _RAISED_LINE.match(line))]
    ours = [message for kind, message in raised if kind == "ClientAppFailed"]
    theirs = [f"{kind}: {message}" for kind, message in raised
              if message and kind not in _WRAPPERS and kind != "ClientAppFailed"]
    if ours or theirs:
        text = (ours or theirs)[-1]
    elif "\n" not in text and name and not name.startswith(_WRAPPERS):
        text = text if name == "ClientAppFailed" else f"{name}: {text}"
    else:
        text = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_client_app(app: ClientApp, message: Message, context: Context) -> Message:
    """Call the ClientApp; turn an exception into an error reply, as Flower's engines do."""
    try:
        reply = app(message, context)
    except Exception as err:  # noqa: BLE001 - a client's failure must not stop the server
        reason = f"<class '{type(err).__module__}.{type(err).__qualname__}'>:<'{err}'>"
        reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                        reply_to=message)
    return with_message_id(reply)


def with_message_id(reply: Message) -> Message:
    """`reply` with a fresh message id, as a SuperNode's reply gets one (the reply check
    and the strategies key replies by it)."""
    reply.metadata.__dict__["_message_id"] = uuid4().hex
    return reply


def node_context(node_id: int, num_nodes: int, run_config: dict) -> Context:
    """A fresh node Context: partition `node_id - 1` of `num_nodes`, empty state."""
    return Context(
        run_id=RUN_ID,
        node_id=node_id,
        node_config={PARTITION_ID_KEY: node_id - 1, NUM_PARTITIONS_KEY: num_nodes},
        state=RecordDict(),
        run_config=dict(run_config),
    )


def server_context(run_config: dict) -> Context:
    return Context(
        run_id=RUN_ID, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
        run_config=dict(run_config),
    )


class SimulationGrid(Grid):
    """A Grid over `num_nodes` simulated nodes whose contexts are created on first use."""

    def __init__(self, num_nodes: int, run_config: dict) -> None:
        self.num_nodes = num_nodes
        self.run_config = dict(run_config)
        self.contexts: dict[int, Context] = {}
        self._run = Run.create_empty(RUN_ID)
        self._pending: dict[str, Message] = {}
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return range(1, self.num_nodes + 1)

    def context(self, node_id: int) -> Context:
        if node_id not in self.contexts:
            self.contexts[node_id] = node_context(node_id, self.num_nodes, self.run_config)
        return self.contexts[node_id]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if not 1 <= msg.metadata.dst_node_id <= self.num_nodes:
                raise ValueError(f"no node {msg.metadata.dst_node_id} in this federation")
            msg.metadata.__dict__["_run_id"] = RUN_ID
            msg.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            self._pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._pull(list(message_ids), timeout=None)

    def _pull(self, wanted: list[str], timeout: float | None) -> list[Message]:
        todo = [self._pending.pop(i) for i in wanted if i in self._pending]
        if todo:
            for reply in self.execute(todo, timeout):
                self._replies[reply.metadata.reply_to_message_id] = reply
        return [self._replies.pop(i) for i in wanted if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Run the messages now; with `timeout`, late replies are lost (see `execute`)."""
        return self._pull(list(self.push_messages(messages)), timeout)

    @abstractmethod
    def execute(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        """Run the ClientApp for each message on its node; return the replies that came
        within `timeout` seconds (None waits for all)."""


class GridWrapper(Checkpointed, Grid):
    """A Grid that forwards every call to `grid`; subclasses override what they change."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    @property
    def model_destroyed(self) -> bool:
        """Whether a wrapped `ReplyGuard` found the global model destroyed."""
        return bool(getattr(self.grid, "model_destroyed", False))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


def replier(reply: Message, addressee: dict[str, int]) -> int:
    """The node a reply answers for: the node its message was sent to. An error reply the
    SuperLink makes for a lost node carries the SuperLink's own id as its source."""
    return addressee.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


class MeteredGrid(GridWrapper):
    """Wraps any Grid: meters each round's traffic and failures; lists nodes in a stable order.

    Flower samples clients with `random.sample(list(grid.get_node_ids()), k)`;
    sorting the ids makes that draw depend only on the seed and the node set.
    A client that answers with an error, or not at all, is counted per message
    type and logged with its node id, so a failure is never silent. Once the model
    is destroyed (`model_destroyed`, logged once), failures are still counted but
    logged at debug level: every round would repeat them.
    """

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.counts: Counter[str] = Counter()

    def get_node_ids(self) -> Iterable[int]:
        ids = self.grid.get_node_ids()
        if isinstance(ids, range) and ids.step > 0:  # a simulation's nodes: sorted already,
            return ids  # and sorting 100,000 of them every round costs milliseconds
        return sorted(ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.counts["bytes_down"] += sum(content_nbytes(m.content) for m in messages)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        self._count_replies(replies)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        self.counts["bytes_down"] += sum(content_nbytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        addressee = {m.metadata.message_id: m.metadata.dst_node_id for m in messages
                     if m.metadata.message_id}
        self._count_replies(replies, addressee)
        kind = messages[0].metadata.message_type.split(".")[0]
        answered = {replier(reply, addressee) for reply in replies}
        silent = sorted({m.metadata.dst_node_id for m in messages} - answered)
        if silent:
            self.counts[f"{kind}_failures"] += len(silent)
            log.log(self._level(), "client node(s) %s sent no %s reply before the round's "
                    "deadline (faults.timeout_s)", silent, kind)
        return replies

    def _count_replies(self, replies: list[Message], addressee: dict[str, int] | None = None
                       ) -> None:
        failed = [m for m in replies if m.has_error()]
        self.counts["bytes_up"] += sum(
            content_nbytes(m.content) for m in replies if m.has_content()
        )
        for msg in failed[:MAX_LOGGED_FAILURES]:
            log.log(
                self._level(), "client node %d failed (%s): %s", replier(msg, addressee or {}),
                msg.metadata.message_type, failure_cause(msg.error.reason),
            )
        if len(failed) > MAX_LOGGED_FAILURES:
            log.log(self._level(), "... and %d more client failures",
                    len(failed) - MAX_LOGGED_FAILURES)
        for msg in failed:
            self.counts[f"{msg.metadata.message_type.split('.')[0]}_failures"] += 1

    def _level(self) -> int:
        return logging.DEBUG if self.model_destroyed else logging.WARNING

    def take_counts(self) -> dict[str, int]:
        """bytes_down, bytes_up, train_failures, evaluate_failures since the last call, and
        the wrapped grid's own counts (if it keeps any)."""
        keys = ("bytes_down", "bytes_up", "train_failures", "evaluate_failures")
        counts = {k: int(self.counts[k]) for k in keys}
        self.counts.clear()
        inner = getattr(self.grid, "take_counts", None)
        return {**counts, **(inner() if inner else {})}
