"""Grids for simulation, and the byte meter every run's grid is wrapped in.

A `SimulationGrid` implements Flower's `Grid` for clients that live in (or are
driven from) this process: node `i + 1` holds partition `i`, each node keeps
its `Context` across rounds, and `send_and_receive` returns as soon as the
replies exist instead of polling a message store.
"""

from __future__ import annotations

import traceback
from abc import abstractmethod
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run

RUN_ID = 1


def content_nbytes(content: RecordDict) -> int:
    """Bytes of array payload in a message's content (what dominates the wire)."""
    return sum(
        len(array.data) for record in content.array_records.values() for array in record.values()
    )


def run_client_app(app: ClientApp, message: Message, context: Context) -> Message:
    """Call the ClientApp; turn an exception into an error reply, as Flower's engines do."""
    try:
        reply = app(message, context)
    except Exception as err:  # noqa: BLE001 - a client's failure must not stop the server
        detail = traceback.format_exc(limit=3)
        reply = Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{err!r}\n{detail}"),
            reply_to=message,
        )
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
        wanted = list(message_ids)
        todo = [self._pending.pop(i) for i in wanted if i in self._pending]
        if todo:
            for reply in self.execute(todo):
                self._replies[reply.metadata.reply_to_message_id] = reply
        return [self._replies.pop(i) for i in wanted if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    @abstractmethod
    def execute(self, messages: list[Message]) -> list[Message]:
        """Run the ClientApp for each message on its node; return the replies."""


class MeteredGrid(Grid):
    """Wraps any Grid: counts payload bytes each way and lists nodes in a stable order.

    Flower samples clients with `random.sample(list(grid.get_node_ids()), k)`;
    sorting the ids makes that draw depend only on the seed and the node set.
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.bytes_down = 0
        self.bytes_up = 0

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.grid.get_node_ids())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.bytes_down += sum(content_nbytes(m.content) for m in messages)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        self.bytes_up += sum(content_nbytes(m.content) for m in replies if m.has_content())
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        self.bytes_down += sum(content_nbytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.bytes_up += sum(content_nbytes(m.content) for m in replies if m.has_content())
        return replies

    def take_bytes(self) -> tuple[int, int]:
        """Bytes (down, up) since the last call."""
        counts = (self.bytes_down, self.bytes_up)
        self.bytes_down = self.bytes_up = 0
        return counts
