"""The server's check of every reply: what a round tolerates from its clients.

`ReplyGuard` wraps the run's grid. It reads every reply against the message it
answers before any strategy sees it: a reply with missing or extra records,
arrays of the wrong keys, shapes or dtypes, NaN/Inf values, or an absurd
`num-examples` becomes an error reply (dropped, logged with the node id,
counted as a failure), so no strategy, Flower's included, aggregates it or
crashes on it. A round with fewer valid train replies than `faults.min_replies`
is skipped: every reply is dropped and the global model is kept. After
`faults.max_skipped_rounds` rounds in a row that applied no update, the run stops.

A model destroyed by an attack is a result, not a fault: once the global arrays are
not finite, or every train reply of a round is not finite after an applied update
that included a malicious client's upload (`model_destroyed`), the guard logs it
once, marks every later row `model_destroyed`, and skipped rounds no longer stop the
run, which goes on to its last round at the accuracy the model really has.

The checks themselves (`reply_problem`, `keys_problem`, `same_arrays_problem`,
`stored_like`, `alike`...) are pure functions of records and arrays; strategies
use them for their own `upload_problem`. The client side, faults injected to
exercise all of this, is `fedsim.fault_injection`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedsim.backends.base import GridWrapper
from fedsim.errors import RunFailedError
from fedsim.metrics import NUM_EXAMPLES
from fedsim.npy import npy_header

log = logging.getLogger("fedsim")

REJECTED = "reply rejected by the server"
Arrays = dict[str, np.ndarray]
#: (upload, arrays sent) -> what is wrong with an uploaded ArrayRecord, or None
UploadCheck = Callable[[ArrayRecord, Arrays], "str | None"]


def keys_problem(upload: ArrayRecord, sent: Arrays) -> str | None:
    """An upload must carry exactly the sent record's keys."""
    keys, expected = set(upload.keys()), set(sent.keys())
    if keys == expected:
        return None
    return (f"arrays must have the global model's keys (missing {sorted(expected - keys)[:5]}, "
            f"unexpected {sorted(keys - expected)[:5]})")


def same_arrays_problem(upload: ArrayRecord, sent: Arrays) -> str | None:
    """Weights or deltas: the sent keys, each array as `same_array_problem` wants it.

    An array stored exactly like the sent one (same NPY header, same length) is
    read in place and only checked for finite values; others are decoded and
    checked in full.
    """
    problem = keys_problem(upload, sent)
    for key, like in sent.items():
        if problem:
            break
        values = stored_like(upload[key], like)
        if values is None:
            problem = same_array_problem(key, upload[key].numpy(), like)
        elif np.issubdtype(like.dtype, np.floating) and not np.isfinite(values).all():
            problem = same_array_problem(key, values, like)
    return problem


def stored_like(array: Array, like: np.ndarray) -> np.ndarray | None:
    """The values of `array`, read in place, when its bytes are an NPY file of exactly
    `like`'s shape and dtype; None otherwise (then decode it)."""
    if array.stype != "numpy.ndarray":
        return None
    header = npy_header(like.shape, np.lib.format.dtype_to_descr(like.dtype))
    data = array.data
    if len(data) != len(header) + like.nbytes or not data.startswith(header):
        return None
    return np.frombuffer(data, dtype=like.dtype, offset=len(header)).reshape(like.shape)


def same_array_problem(key: str, upload: np.ndarray, sent: np.ndarray) -> str | None:
    """An upload of weights or deltas must match the sent array's shape and kind of dtype
    (floating, integer...), with finite values."""
    where = f"arrays['{key}']"
    if upload.shape != sent.shape:
        return f"{where} must have shape {sent.shape} (got {upload.shape})"
    if upload.dtype.kind != sent.dtype.kind:  # float32 for float64 is fine (FedAdam's globals)
        return f"{where} must have a {sent.dtype.kind!r}-kind dtype like the sent {sent.dtype} " \
               f"(got {upload.dtype})"
    if np.issubdtype(upload.dtype, np.floating):
        if upload.dtype != sent.dtype:  # finite in float64 may overflow the model's float32
            with np.errstate(over="ignore"):
                upload = upload.astype(sent.dtype)
        if not np.isfinite(upload).all():
            return f"{where} must be finite in {sent.dtype} (got NaN or inf: did local " \
                   "training diverge?)"
    return None


def examples_problem(value: object, max_examples: int, minimum: int,
                     key: str = NUM_EXAMPLES) -> str | None:
    """A sample count must be a whole number in [minimum, max_examples]."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value != int(value) or not minimum <= value <= max_examples:
        return (f"metrics['{key}'] must be a whole number in [{minimum}, {max_examples}] "
                f"(got {value!r})")
    return None


def metrics_problem(record: MetricRecord, weight_key: str, max_examples: int, minimum: int
                    ) -> str | None:
    """Sample counts are whole numbers in range (the weight at least `minimum`); every other
    metric is finite."""
    problem = examples_problem(record[weight_key], max_examples, minimum, weight_key)
    for key, value in record.items():
        if problem:
            break
        if key != weight_key and str(key).startswith(NUM_EXAMPLES):  # per class group
            problem = examples_problem(value, max_examples, 0, key)
        elif not all(math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            problem = f"metrics['{key}'] must be finite (got {value!r})"
    return problem


def reply_problem(
    reply: RecordDict,
    sent: Arrays | None,
    weight_key: str,
    max_examples: int,
    check_upload: UploadCheck,
) -> str | None:
    """What makes a reply unusable, or None.

    Train replies (`sent`: the arrays sent) carry exactly one ArrayRecord
    that passes `check_upload`, and at least one example;
    evaluate replies (`sent` None) carry no arrays to check and may report zero
    examples. Both carry exactly one MetricRecord with a valid `weight_key`
    and finite metrics (Flower's strategies aggregate these).
    """
    metrics = list(reply.metric_records.values())
    if len(metrics) != 1:
        return f"must carry exactly one MetricRecord (got {len(metrics)})"
    record = metrics[0]
    if weight_key not in record:
        return f"metrics must include '{weight_key}'"
    problem = metrics_problem(record, weight_key, max_examples, 1 if sent is not None else 0)
    if problem:
        return problem
    if sent is None:
        return None
    arrays = list(reply.array_records.values())
    if len(arrays) != 1:
        return f"must carry exactly one ArrayRecord (got {len(arrays)})"
    try:
        return check_upload(arrays[0], sent)
    except Exception as err:  # noqa: BLE001 - undecodable bytes from a peer
        return f"arrays cannot be decoded ({err!r})"


def finite_values(values: Iterable[object]) -> bool:
    """Whether every number in `values` (numbers or lists of numbers) is finite."""
    return all(math.isfinite(v) for value in values
               for v in (value if isinstance(value, list) else [value])
               if isinstance(v, int | float))


def finite_arrays(arrays: Iterable[np.ndarray]) -> bool:
    """Whether every floating array holds only finite values (other dtypes always do)."""
    return all(np.isfinite(a).all() for a in arrays if np.issubdtype(a.dtype, np.floating))


def nonfinite_reply(content: RecordDict) -> bool:
    """Whether a reply carries a NaN or inf, in a metric or in a floating array (an
    undecodable array is not counted as one)."""
    if not all(finite_values(record.values()) for record in content.metric_records.values()):
        return True
    try:
        return not all(finite_arrays(a.numpy() for a in record.values())
                       for record in content.array_records.values())
    except Exception:  # noqa: BLE001 - undecodable bytes from a peer: another problem
        return False


def model_destroyed(global_finite: bool, poisoned: bool, nonfinite: list[bool]) -> bool:
    """Whether a round shows the global model destroyed: its arrays are not finite, or,
    once an applied update included a malicious upload (`poisoned`), every one of the
    round's train replies (`nonfinite`: one flag per reply, at least one reply) was not
    finite. Honest faults alone (`poisoned` false) never destroy a finite model."""
    return not global_finite or (poisoned and bool(nonfinite) and all(nonfinite))


def rejected(reply: Message, reason: str) -> Message:
    """An error reply in place of `reply`, which the strategies then drop."""
    error = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                          reason=f"{REJECTED}: {reason}"), reply_to=_original(reply))
    error.metadata.__dict__["_src_node_id"] = reply.metadata.src_node_id
    error.metadata.__dict__["_message_id"] = reply.metadata.message_id
    return error


def _original(reply: Message) -> Message:
    """A stand-in for the message `reply` answers (what `Message(reply_to=...)` reads)."""
    stub = Message(RecordDict(), dst_node_id=reply.metadata.src_node_id,
                   message_type=reply.metadata.message_type)
    stub.metadata.__dict__["_message_id"] = reply.metadata.reply_to_message_id
    stub.metadata.__dict__["_src_node_id"] = reply.metadata.dst_node_id
    stub.metadata.__dict__["_run_id"] = reply.metadata.run_id
    stub.metadata.__dict__["_group_id"] = reply.metadata.group_id
    return stub


class ReplyGuard(GridWrapper):
    """Checks every reply of `send_and_receive` (what Flower's strategies call) against the
    message sent; enforces the minimum-replies rule and stops a run that makes no progress.

    Parameters
    ----------
    grid : the grid to wrap.
    weight_key : the metric the strategy weights by (`num-examples`).
    max_examples : the most examples a reply may claim.
    check_upload : the check of a train upload against the arrays sent (the strategy's
        `upload_problem`, else `same_arrays_problem`).
    min_replies, max_skipped_rounds, timeout_s : `faults.*`; `timeout_s` also bounds the
        calls that come without a timeout (an asynchronous strategy's mid-round starts).
    malicious : node ids of the attack's malicious clients (none: no attack). Once an
        update that included one of their uploads was applied, a round whose train
        replies are all non-finite means the model is destroyed (`model_destroyed`).
    """

    def __init__(
        self,
        grid: Grid,
        weight_key: str,
        max_examples: int,
        check_upload: UploadCheck = same_arrays_problem,
        min_replies: int = 1,
        max_skipped_rounds: int = 3,
        timeout_s: float | None = None,
        malicious: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__(grid)
        self.weight_key = weight_key
        self.max_examples = max_examples
        self.check_upload = check_upload
        self.min_replies = min_replies
        self.max_skipped_rounds = max_skipped_rounds
        self.timeout_s = timeout_s
        self.malicious = frozenset(malicious)
        self.skipped_in_a_row = 0
        self.skipped_rounds = 0  # since the last `take_counts`
        self.malicious_passed = False  # a valid malicious upload went to the strategy
        self.poisoned = False  # an applied update included a malicious upload
        self.destroyed_round: int | None = None  # the round the model was found destroyed
        self.nonfinite: list[bool] = []  # per train reply of the current round

    @property
    def model_destroyed(self) -> bool:
        """Whether the global model was found destroyed (see `model_destroyed`)."""
        return self.destroyed_round is not None

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """The inner grid's replies, each checked against the message sent to its node and
        against the round's other replies (Flower aggregates only alike replies)."""
        messages = list(messages)
        sent = {msg.metadata.dst_node_id: msg for msg in messages}
        decoded: dict[int, Arrays] = {}  # each distinct ArrayRecord sent, decoded once
        timeout = self.timeout_s if timeout is None else timeout
        replies = [self._checked(reply, sent.get(reply.metadata.src_node_id), decoded)
                   for reply in self.grid.send_and_receive(messages, timeout=timeout)]
        replies = alike(replies)
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            replies = self._apply_min_replies(replies)
            self.malicious_passed |= any(not r.has_error() and r.metadata.src_node_id
                                         in self.malicious for r in replies)
        return replies

    def _checked(self, reply: Message, sent: Message | None, decoded: dict[int, Arrays]
                 ) -> Message:
        if reply.has_error():
            return reply
        if sent is None:
            return rejected(reply, "no message was sent to this node")
        if not reply.has_content():
            return rejected(reply, "no content")
        arrays = None
        if sent.metadata.message_type == MessageType.TRAIN:
            record = next(iter(sent.content.array_records.values()), ArrayRecord())
            if id(record) not in decoded:
                decoded[id(record)] = {key: array.numpy() for key, array in record.items()}
            arrays = decoded[id(record)]
        problem = reply_problem(reply.content, arrays, self.weight_key, self.max_examples,
                                self.check_upload)
        if arrays is not None:
            self.nonfinite.append(problem is not None and nonfinite_reply(reply.content))
        return reply if problem is None else rejected(reply, problem)

    def _apply_min_replies(self, replies: list[Message]) -> list[Message]:
        """Drop a train round's replies when fewer than `min_replies` are valid."""
        valid = sum(not reply.has_error() for reply in replies)
        if valid >= self.min_replies:
            return replies
        log.log(logging.DEBUG if self.model_destroyed else logging.WARNING,
                "only %d valid train replies, fewer than faults.min_replies=%d: the round "
                "is skipped and the global model kept", valid, self.min_replies)
        reason = f"round skipped: {valid} valid replies < faults.min_replies={self.min_replies}"
        return [reply if reply.has_error() else rejected(reply, reason) for reply in replies]

    def after_train(self, server_round: int, replies: list[Message],
                    arrays: ArrayRecord | None, metrics: MetricRecord | None) -> None:
        """Count a round without a valid train reply that applied no update (an
        asynchronous round may still apply held ones) as a skipped round, and stop the run
        after `max_skipped_rounds` of them in a row, unless the model is destroyed (then
        the run goes on to its last round). The engine's `EngineStrategy` calls it after
        each `aggregate_train`."""
        no_reply = all(reply.has_error() for reply in replies)
        nonfinite, self.nonfinite = self.nonfinite, []
        if arrays is not None and self.malicious_passed:
            self.poisoned = True
        global_finite = arrays is None or finite_arrays(a.numpy() for a in arrays.values())
        if not self.model_destroyed and model_destroyed(global_finite, self.poisoned, nonfinite):
            self.destroyed_round = server_round
            log.warning(
                "round %d: the global model is destroyed (%s); the run goes on to its last "
                "round and records it (model_destroyed), rounds without a valid reply no "
                "longer stop it, and client failures are no longer logged one by one",
                server_round, "its arrays are not finite" if not global_finite else
                "every train reply is NaN or inf after an update with a malicious upload")
        self._count(server_round, skipped=no_reply and arrays is None)

    def _count(self, server_round: int, skipped: bool) -> None:
        if not skipped:
            self.skipped_in_a_row = 0
            return
        self.skipped_rounds += 1
        if self.model_destroyed:  # a result to record to the last round, not a fault
            return
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= self.max_skipped_rounds:
            raise RunFailedError(
                f"round {server_round}: {self.skipped_in_a_row} rounds in a row applied no "
                f"update (fewer than faults.min_replies={self.min_replies} valid train "
                f"replies; faults.max_skipped_rounds={self.max_skipped_rounds}); see the client "
                "failures logged above"
            )

    def take_counts(self) -> dict[str, int | bool]:
        """skipped_rounds since the last call; `model_destroyed` (true) once it is."""
        counts: dict[str, int | bool] = {"skipped_rounds": self.skipped_rounds}
        if self.model_destroyed:
            counts["model_destroyed"] = True
        self.skipped_rounds = 0
        return counts


def reply_shape(reply: Message) -> tuple:
    """What Flower requires to be the same across a round's replies: the record names and
    the metric keys."""
    content = reply.content
    return (tuple(sorted(content.array_records)), tuple(sorted(content.metric_records)),
            tuple(sorted(k for r in content.metric_records.values() for k in r)))


def alike(replies: list[Message]) -> list[Message]:
    """The replies whose records and metric keys match the most common ones (ties: the
    lowest node's); the others are rejected, naming the difference."""
    valid = sorted((r for r in replies if not r.has_error()),
                   key=lambda r: r.metadata.src_node_id)
    shapes = {id(r): reply_shape(r) for r in valid}
    order = list(shapes.values())
    if len(set(order)) < 2:
        return replies
    common = max(order, key=lambda shape: (order.count(shape), -order.index(shape)))
    return [r if r.has_error() or shapes[id(r)] == common
            else rejected(r, _unlike(shapes[id(r)], common)) for r in replies]


def _unlike(mine: tuple, common: tuple) -> str:
    names = ("record names", "metric record names", "metric keys")
    return "its " + ", ".join(
        f"{name} {list(a)} differ from the other replies' {list(b)}"
        for name, a, b in zip(names, mine, common, strict=True) if a != b)
