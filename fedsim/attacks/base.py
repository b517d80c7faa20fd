"""Poisoning attacks: malicious clients that collude, usable with any strategy.

The malicious clients are partitions `0 .. int(fraction * num_clients) - 1`
(nodes `1 .. M` in simulation). They run the configured trainer honestly, from
the global model they receive; the `AdversarialGrid` then stands in for their
side channel: it pools the honest uploads of the colluding malicious clients
(never a benign client's), asks the attack for one crafted upload, and every
malicious client of the round submits it. Each round's cohort is redrawn while
malicious clients would be half of it or more (the FRL reference's protocol).

Like the FRL reference, the colluders are more than the round's own malicious
clients: up to `colluders` malicious clients train each attacked round (the
round's first, then others drawn at random), so that statistics such as a
coordinate-wise standard deviation exist even when one attacker is sampled.
Their extra uploads feed the attack only; the server never sees them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from fedsim.backends.base import GridWrapper
from fedsim.clients.base import UPLOADS_DELTAS, UPLOADS_WEIGHTS
from fedsim.errors import ConfigError, is_int, is_number, require
from fedsim.spec import RunSpec, client_uploads
from fedsim.state import Checkpointed

MAX_COHORT_DRAWS = 1000
Arrays = dict[str, np.ndarray]


class Attack(Checkpointed, ABC):
    """What the colluding malicious clients submit, given their honest uploads.

    Parameters
    ----------
    fraction : float
        Share of registered clients that are malicious, in [0, 0.5).
    colluders : int
        How many malicious clients train honestly in an attacked round to inform
        the attack (at least the round's own; 25 in the FRL reference).
    """

    #: Upload kinds (`Trainer.uploads`) the attack can forge.
    targets: tuple[str, ...] = ()
    #: Server strategies the attack is tailored to (None: any).
    aggregators: tuple[type[Strategy], ...] | None = None
    #: the server's strategy is checkpointed on its own
    not_checkpointed = ("strategy",)

    def __init__(self, fraction: float = 0.0, colluders: int = 25) -> None:
        require(is_number(fraction) and 0 <= fraction < 0.5, "attack.fraction",
                "a number in [0, 0.5)", fraction)
        require(is_int(colluders) and colluders >= 0, "attack.colluders", "an integer >= 0",
                colluders)
        self.fraction = fraction
        self.colluders = colluders
        self.strategy: Strategy | None = None

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        """With malicious clients: an upload kind this attack forges, a strategy it is
        tailored to, and simulated nodes (malicious clients are found by node id).

        With fewer than half of all clients malicious, every cohort size admits a
        benign majority, so the cohort redraws always end.
        """
        cfg, attack = spec.cfg, spec.cfg.attack
        if not malicious_nodes(attack.get("fraction", 0.0), cfg.num_clients):
            return
        uploads = client_uploads(cfg)
        require(uploads in cls.targets, "attack",
                f"an attack on {uploads} uploads (attack {attack._target_} forges "
                f"{' or '.join(cls.targets)}: rank_reversal for client=frl, scaling or "
                "tailored for weight uploads)", str(attack._target_))
        if cls.aggregators is not None:
            require(issubclass(get_class(cfg.strategy._target_), cls.aggregators), "strategy",
                    f"one of {[c.__name__ for c in cls.aggregators]} for attack "
                    f"{attack._target_} (it simulates the server's rule)",
                    str(cfg.strategy._target_))
        require(getattr(get_class(cfg.backend._target_), "partition_node_ids", False),
                "backend", "inprocess or ray under an attack (malicious clients are found by "
                "node id)", str(cfg.backend._target_))

    def prepare(self, strategy: Strategy) -> None:
        """Check and keep the server's strategy before the first round."""
        if self.aggregators is not None and not isinstance(strategy, self.aggregators):
            raise ConfigError(
                f"strategy must be one of {[c.__name__ for c in self.aggregators]} for "
                f"{type(self).__name__} (got {type(strategy).__name__})"
            )
        self.strategy = strategy

    @abstractmethod
    def craft(self, honest: list[Arrays], global_arrays: Arrays, num_malicious: int) -> Arrays:
        """The one upload every malicious client of the round submits.

        `honest` holds the colluders' honest uploads, as updates `w_i - w` for
        weight and delta uploads (floating entries only) or as received for other
        kinds (rankings); the result is in the same form.
        """


class NoAttack(Attack):
    """Every client is honest."""

    def __init__(self) -> None:
        super().__init__(fraction=0.0, colluders=0)

    def craft(self, honest: list[Arrays], global_arrays: Arrays, num_malicious: int) -> Arrays:
        raise RuntimeError("NoAttack has no malicious clients")


def malicious_nodes(fraction: float, num_clients: int) -> frozenset[int]:
    """Simulation node ids of the malicious clients: partitions below fraction * N."""
    return frozenset(range(1, int(fraction * num_clients) + 1))


def benign_majority_cohort(
    draw: Callable[[], Iterable[Message]], malicious: frozenset[int]
) -> list[Message]:
    """The first training cohort from `draw` in which malicious clients are fewer than half.

    `draw` is the strategy's own `configure_train` for the round (the engine's
    `EngineStrategy` calls this), so the redraws are as reproducible as the first draw.
    """
    for _ in range(MAX_COHORT_DRAWS):
        messages = list(draw())
        bad = sum(msg.metadata.dst_node_id in malicious for msg in messages)
        if not messages or 2 * bad < len(messages):
            return messages
    raise RuntimeError(f"no cohort with a benign majority in {MAX_COHORT_DRAWS} draws")


def attach_attack(cfg: DictConfig, strategy: Strategy, grid: Grid) -> tuple[Grid, frozenset[int]]:
    """`grid` with the configured attack in front of it (unchanged when nobody is malicious),
    and the malicious nodes, whose majorities the engine's cohorts must avoid."""
    attack: Attack = instantiate(cfg.attack)
    malicious = malicious_nodes(attack.fraction, cfg.num_clients)
    if not malicious:
        return grid, malicious
    attack.prepare(strategy)
    return AdversarialGrid(grid, attack, malicious, client_uploads(cfg), cfg.seed), malicious


def to_updates(upload: ArrayRecord, global_arrays: Arrays, kind: str) -> Arrays:
    """An upload as the attack sees it: floating updates for weights/deltas, else as is."""
    arrays = {key: array.numpy() for key, array in upload.items()}
    if kind not in (UPLOADS_WEIGHTS, UPLOADS_DELTAS):
        return arrays
    floating = [k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating)]
    if kind == UPLOADS_WEIGHTS:
        return {k: arrays[k] - global_arrays[k] for k in floating}
    return {k: arrays[k] for k in floating}


def to_upload(crafted: Arrays, template: ArrayRecord, global_arrays: Arrays,
              kind: str) -> ArrayRecord:
    """The crafted arrays in the wire format; entries not crafted keep the template's."""
    out = {}
    for key, array in template.items():
        if key not in crafted:
            out[key] = array
            continue
        value = crafted[key]
        if kind == UPLOADS_WEIGHTS:
            value = global_arrays[key] + value
        out[key] = Array(np.asarray(value).astype(array.dtype, copy=False))
    return ArrayRecord(out)


class AdversarialGrid(GridWrapper):
    """A Grid that lets the round's malicious clients collude before their replies leave.

    Only `send_and_receive` (what `Strategy.start` uses) is attacked; message
    pushes and pulls pass through untouched.
    """

    #: the attack is checkpointed on its own
    not_checkpointed = ("attack",)

    def __init__(self, grid: Grid, attack: Attack, malicious: frozenset[int], upload_kind: str,
                 seed: int) -> None:
        super().__init__(grid)
        self.attack = attack
        self.malicious = malicious
        self.upload_kind = upload_kind
        self.seed = seed
        self.rounds = 0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return self.grid.send_and_receive(messages, timeout=timeout)
        self.rounds += 1
        cohort = {msg.metadata.dst_node_id for msg in messages}
        in_cohort = cohort & self.malicious
        if not in_cohort:
            return self.grid.send_and_receive(messages, timeout=timeout)
        extra = [self._copy_to(messages[0], node) for node in self._extra_colluders(cohort)]
        replies = list(self.grid.send_and_receive(messages + extra, timeout=timeout))
        self._forge(messages[0], replies, len(in_cohort))
        return [reply for reply in replies if reply.metadata.src_node_id in cohort]

    def _extra_colluders(self, cohort: set[int]) -> list[int]:
        """Malicious clients outside the cohort that also train, up to `colluders` in all."""
        others = sorted(self.malicious - cohort)
        wanted = min(self.attack.colluders, len(self.malicious)) - len(cohort & self.malicious)
        if wanted <= 0 or not others:
            return []
        rng = np.random.default_rng([self.seed, self.rounds, 0xA77AC])
        return sorted(rng.choice(others, size=min(wanted, len(others)), replace=False).tolist())

    def _copy_to(self, message: Message, node_id: int) -> Message:
        return self.grid.create_message(
            message.content, message.metadata.message_type, node_id, message.metadata.group_id
        )

    def _forge(self, sent: Message, replies: list[Message], num_malicious: int) -> None:
        """Replace the arrays of the malicious replies with the attack's upload."""
        colluding = sorted(
            (reply for reply in replies
             if reply.metadata.src_node_id in self.malicious and reply.has_content()),
            key=lambda reply: reply.metadata.src_node_id,
        )
        if not colluding:
            return
        global_arrays = {k: a.numpy() for k, a in _arrays_of(sent.content)[1].items()}
        honest = [
            to_updates(_arrays_of(r.content)[1], global_arrays, self.upload_kind)
            for r in colluding
        ]
        crafted = self.attack.craft(honest, global_arrays, num_malicious)
        for reply in colluding:
            key, record = _arrays_of(reply.content)
            content = RecordDict(dict(reply.content.items()))
            content[key] = to_upload(crafted, record, global_arrays, self.upload_kind)
            reply.content = content


def _arrays_of(content: RecordDict) -> tuple[str, ArrayRecord]:
    """The (key, record) of a message's single ArrayRecord."""
    return next(iter(content.array_records.items()))
