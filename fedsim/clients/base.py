"""The trainer interface every local procedure implements.

A trainer is a plain object built from config on whichever party needs it: the
ClientApp calls it for its node, and a server strategy may build the same
trainer to re-run a client's procedure on data of its own (staleness inversion).
Its methods are functions of their inputs: received arrays and config, the
client's data, and the client's persistent state, which comes back as part of
the output instead of being mutated behind the caller's back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from fedsim.datasets.federated import ClientData
from fedsim.errors import MessageError
from fedsim.metrics import NUM_EXAMPLES, classification_metrics, prefixed
from fedsim.spec import RunSpec

Record = ArrayRecord | MetricRecord | ConfigRecord
UPLOADS_WEIGHTS = "weights"  # the trainer sends trained weights (what Flower's strategies expect)
UPLOADS_DELTAS = "deltas"  # the trainer sends w_local - w_global (fedsim.strategies.base)
UPLOADS_RANKINGS = "rankings"  # per state entry, edge ids sorted by score (fedsim.strategies.frl)


#: one client's `train` inputs: received arrays, train config, its data, its state
TrainJob = tuple[ArrayRecord, ConfigRecord, ClientData, RecordDict]


@dataclass
class TrainOutput:
    """What a trainer returns from one round of local training.

    - `arrays`: the upload (weights, deltas, integer rankings: any numpy arrays).
    - `metrics`: scalars for the server; must include `num-examples`.
    - `state`: the client's persistent state for its next round (never uploaded).
    - `records`: further records to upload, keyed by name (e.g. a ConfigRecord).
    """

    arrays: ArrayRecord
    metrics: dict[str, float | int]
    state: RecordDict = field(default_factory=RecordDict)
    records: dict[str, Record] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if NUM_EXAMPLES not in self.metrics:
            raise ValueError(f"trainer metrics must include '{NUM_EXAMPLES}'")


class Trainer(ABC):
    """A client's local procedure, configured once and called every round.

    The class attribute `uploads` says what `train` sends back (`"weights"`,
    `"deltas"` or `"rankings"`); config validation checks it against the strategy's
    expectation.

    Parameters
    ----------
    model_fn : Callable[[], nn.Module]
        Builds the (untrained) model; the trainer loads received arrays into it.
    seed : int
        The run seed; per-round randomness is derived from it and the client id.
    eval_batch_size : int
        Batch size for evaluation passes.
    device : str
        "auto" (CUDA when this process sees a GPU, else CPU), "cpu" or "cuda[:i]".
    """

    uploads = UPLOADS_WEIGHTS
    required_model: str | None = None  # the model `_target_` a method is built around, if any

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        seed: int = 0,
        eval_batch_size: int = 1024,
        device: str = "auto",
    ) -> None:
        self.model_fn = model_fn
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        self.device = resolve_device(device)
        self._model: nn.Module | None = None
        self._received: ArrayRecord | None = None
        self._received_state: dict[str, torch.Tensor] = {}

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        """Needs of this trainer across config groups (`fedsim.spec`); none by default."""
        return None

    @classmethod
    def extend_model(
        cls,
        model: nn.Module,
        input_shape: tuple[int, ...],
        num_classes: int,
        options: Mapping[str, Any],
    ) -> nn.Module:
        """The global model for this trainer, built around the configured `model`.

        A method that trains extra modules every party must share (per-layer heads,
        auxiliary networks) returns a module holding them beside `model`, whose
        forward pass is still `model`'s: they are then part of the global arrays,
        averaged like any weight, and ignored at inference. `options` is the
        client config. By default the model itself.
        """
        return model

    @abstractmethod
    def train(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> TrainOutput:
        """Train locally from the received arrays; return the upload, metrics, new state."""

    def cohort_problem(self) -> str | None:
        """Why `train_cohort` cannot train a round's clients as one vectorized computation,
        or None when it can (`backend.batched`). By default it cannot."""
        return f"{type(self).__name__} has no batched training"

    def train_cohort(self, jobs: Sequence[TrainJob]) -> list[TrainOutput]:
        """`train` for each client of a round, in order. A trainer whose `cohort_problem`
        is None overrides it with one vectorized computation giving the same outputs."""
        return [self.train(*job) for job in jobs]

    def evaluate(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> dict[str, float | int]:
        """Loss and accuracy on the client's test split (per class group when the data has them).

        An empty split reports zeros with weight 0 (`num-examples` = 0), so it
        does not count in the weighted average.
        """
        if len(data.y_test) == 0:
            logits = torch.zeros(0, data.num_classes)
        else:
            logits = self.test_logits(arrays, config, data, state)
        return classification_metrics(logits, data.y_test, data.class_groups)

    def test_logits(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> torch.Tensor:
        """The client's logits on its test split (on the CPU).

        Here the received model's; personalized methods override it to use the
        client's own head or a fine-tuned copy.
        """
        return predict(self.load_model(arrays), data.x_test, self.eval_batch_size)

    def load_model(self, arrays: ArrayRecord) -> nn.Module:
        """The trainer's model instance with `arrays` loaded (built once, then reused).

        A round sends the same ArrayRecord object to every client of a process, so
        its decoded tensors are kept until a different record arrives.
        """
        if self._model is None:  # built once per process: must not consume the seeded stream
            with torch.random.fork_rng(devices=[]):
                self._model = self.model_fn().to(self.device)
        if arrays is not self._received:
            model_shapes = {k: tuple(t.shape) for k, t in self._model.state_dict().items()}
            problem = fit_problem({k: tuple(a.shape) for k, a in arrays.items()}, model_shapes)
            if problem is not None:
                raise MessageError(
                    f"the server's arrays do not fit this client's model "
                    f"({type(self._model).__name__}): {problem}; the server must send the "
                    "model this client's config builds (model, dataset, client)")
            self._received_state = arrays.to_torch_state_dict()
            self._received = arrays
        self._model.load_state_dict(self._received_state)
        return self._model

    def received_state(self) -> dict[str, torch.Tensor]:
        """The state dict last loaded by `load_model` (on the CPU): the global weights."""
        return self._received_state

    def generator(self, data: ClientData, server_round: int) -> torch.Generator:
        """A torch RNG unique to (run seed, client, round): same draws on any backend."""
        return torch.Generator().manual_seed(round_seed(self.seed, data.partition_id, server_round))


def fit_problem(sent: Mapping[str, tuple[int, ...]], model: Mapping[str, tuple[int, ...]],
                shown: int = 3) -> str | None:
    """How the sent arrays' keys and shapes differ from the model's state (its first
    `shown` differences of each kind), or None when they fit."""
    missing = [k for k in model if k not in sent]
    unexpected = [k for k in sent if k not in model]
    reshaped = [f"'{k}' {tuple(sent[k])} sent, {tuple(model[k])} here"
                for k in model if k in sent and tuple(sent[k]) != tuple(model[k])]

    def first(items: list[str]) -> str:
        more = f" and {len(items) - shown} more" if len(items) > shown else ""
        return f"{items[:shown]}{more}"

    parts = [f"missing keys {first(missing)}" if missing else "",
             f"unexpected keys {first(unexpected)}" if unexpected else "",
             *reshaped[:shown],
             f"{len(reshaped) - shown} more shapes differ" if len(reshaped) > shown else ""]
    parts = [part for part in parts if part]
    return "; ".join(parts) or None


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA if this process sees a GPU (a Ray actor with num_gpus > 0), else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def round_seed(seed: int, partition_id: int, server_round: int) -> int:
    """A 63-bit seed for one client's local work in one round."""
    words = np.random.SeedSequence([seed, partition_id + 1, server_round])
    return int(words.generate_state(1, np.uint64)[0] >> 1)


def minibatches(
    num_samples: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Shuffled index batches covering every sample once (the last may be smaller)."""
    yield from torch.randperm(num_samples, generator=generator).split(batch_size)


@torch.no_grad()
def predict(
    model: nn.Module,
    x: torch.Tensor,
    batch_size: int = 1024,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """`model`'s outputs for `x` in eval mode, batch by batch, gathered on the CPU.

    `forward(batch)` replaces `model(batch)` (e.g. to read features instead of logits).
    """
    device = next(model.parameters()).device
    forward = model if forward is None else forward
    was_training = model.training
    model.eval()
    try:
        return torch.cat(
            [forward(x[start : start + batch_size].to(device)).cpu()
             for start in range(0, len(x), batch_size)]
        )
    finally:
        model.train(was_training)


def personal_and_global(
    data: ClientData, personal: Callable[[], torch.Tensor], received: Callable[[], torch.Tensor]
) -> dict[str, float | int]:
    """A personalized method's client metrics: those of its own model's test logits
    (`personal()`), and the received global model's (`received()`) as `global-*`.

    An empty test split scores zero logits with weight 0, as `Trainer.evaluate` does.
    """
    if len(data.y_test) == 0:
        mine = theirs = torch.zeros(0, data.num_classes)
    else:
        mine, theirs = personal(), received()
    metrics = classification_metrics(mine, data.y_test, data.class_groups)
    return metrics | prefixed(classification_metrics(theirs, data.y_test, data.class_groups),
                              "global-")


def gradients_at(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The gradient of `loss(model(x), y)` at `params` (with `buffers`), the model's own
    weights untouched: for methods that step on copies of the weights (Per-FedAvg, pFedMe)."""
    live = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    value = loss(torch.func.functional_call(model, {**live, **buffers}, (x,)), y)
    return dict(zip(live, torch.autograd.grad(value, list(live.values())), strict=True))
