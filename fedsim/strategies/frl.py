"""FRL: Federated Rank Learning (Mozaffari et al., USENIX Security 2023).

Clients train the edge scores of a shared supermask network and send, per layer,
a ranking of its edges (`fedsim.clients.frl`). The server takes a Borda count:
an edge's reputation is the sum of its positions in the clients' rankings, and
the edges, ordered by reputation, receive the layer's score values in sorted
order. The global scores are thus always a permutation of the initial ones, and
each client has exactly one vote: a poisoner can move an edge at most by as
much as one honest client can.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedsim.clients.base import UPLOADS_RANKINGS
from fedsim.errors import MessageError, require
from fedsim.reply_check import keys_problem
from fedsim.spec import RunSpec
from fedsim.strategies.base import UploadStrategy
from fedsim.supermask import MASK_MODES


def edge_positions(rankings: np.ndarray) -> np.ndarray:
    """Each client's position of every edge: the inverse of each row's permutation.

    `rankings[i]` lists edge ids from least to most important; the result's
    `[i, e]` is where edge `e` stands in client i's ranking.
    """
    m, n = rankings.shape
    positions = np.empty((m, n), dtype=np.int64)
    positions[np.arange(m)[:, None], rankings.astype(np.int64)] = np.arange(n)
    return positions


def borda_order(rankings: np.ndarray) -> np.ndarray:
    """Edge ids by total position over the clients (reputation), least-voted first.

    Equal reputations are ordered by edge id (a stable sort), on every platform.
    """
    reputation = edge_positions(rankings).sum(axis=0)
    return np.argsort(reputation, kind="stable")


def vote(rankings: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The new scores of one layer: its sorted score values, handed out in vote order.

    `scores` are the layer's current global scores; since every vote permutes the
    initial values, sorting them gives the sorted initial values at any round.
    """
    new = np.empty(scores.size, dtype=scores.dtype)
    new[borda_order(rankings)] = np.sort(scores, axis=None)
    return new.reshape(scores.shape)


def ranking_problem(key: str, upload: np.ndarray, num_edges: int) -> str | None:
    """What keeps `upload` from being a permutation of the layer's edge ids, or None."""
    where = f"arrays['{key}']"
    if not np.issubdtype(upload.dtype, np.integer):
        return f"{where} must be an integer ranking of edge ids (got {upload.dtype})"
    if upload.shape != (num_edges,):
        return f"{where} must have shape ({num_edges},) (got {upload.shape})"
    seen = np.zeros(num_edges, dtype=bool)
    in_range = (upload >= 0) & (upload < num_edges)
    seen[upload[in_range].astype(np.int64)] = True
    if not (in_range.all() and seen.all()):
        return f"{where} must list every edge id 0..{num_edges - 1} exactly once"
    return None


def check_ranking(node_id: int, key: str, upload: np.ndarray, num_edges: int) -> None:
    """Reject an upload that is not a permutation of the layer's edge ids as integers."""
    problem = ranking_problem(key, upload, num_edges)
    if problem:
        raise MessageError(f"reply from node {node_id}: {problem}")


class FRL(UploadStrategy):
    """Borda voting on the clients' edge rankings, per layer.

    Parameters
    ----------
    mask_mode : str
        `reference` (default; the authors' code masks by |score|, which keeps both
        ends of the vote order) or `topk` (the paper: keep the top-voted edges).
        Sent to the clients as `mask-mode` with every train and evaluate message;
        the server's own evaluation reads it through the model config.
    **kwargs
        FedAvg's arguments (cohort sizes, record keys, metric aggregation).
    """

    expects_uploads = UPLOADS_RANKINGS

    def __init__(self, mask_mode: str = "reference", **kwargs) -> None:
        require(mask_mode in MASK_MODES, "strategy.mask_mode", f"one of {MASK_MODES}", mask_mode)
        super().__init__(**kwargs)
        self.mask_mode = mask_mode

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        """The mask mode is the strategy's: the server's model follows it (the supermask
        model yamls read `strategy.mask_mode`), and a model set otherwise is refused."""
        strategy, model = spec.cfg.strategy, spec.cfg.model
        mode = strategy.get("mask_mode", "reference")
        require(model.get("mask_mode", mode) == mode, "model.mask_mode",
                f"the strategy's ({mode}): clients train with the strategy's mask and the "
                "server must evaluate with the same one (leave model.mask_mode unset)",
                model.get("mask_mode"))

    def upload_problem(self, upload: ArrayRecord, sent: dict[str, np.ndarray]) -> str | None:
        """What is wrong with a client's rankings (for `fedsim.reply_check.ReplyGuard`), or None."""
        problem = keys_problem(upload, sent)
        for key in sent:
            problem = problem or ranking_problem(key, upload[key].numpy(), sent[key].size)
        return problem

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["mask-mode"] = self.mask_mode
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["mask-mode"] = self.mask_mode
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_uploads(
        self, server_round: int, uploads: list[tuple[int, ArrayRecord]]
    ) -> tuple[ArrayRecord, dict[str, float]]:
        """Vote every layer.

        Metric `median-crossings`: the fraction of edges whose score moved to the
        other side of its layer's median (how much the vote changed the model).
        """
        expected = set(self.current_arrays)
        for node_id, record in uploads:
            if set(record.keys()) != expected:
                raise MessageError(
                    f"reply from node {node_id}: arrays must rank exactly the global model's "
                    f"entries {sorted(expected)[:5]} (got {sorted(record.keys())[:5]})"
                )
        new_arrays, crossed = {}, 0
        for key, scores in self.current_arrays.items():
            stacked = []
            for node_id, record in uploads:
                ranks = record[key].numpy()  # decodes the payload: once per upload
                check_ranking(node_id, key, ranks, scores.size)
                stacked.append(ranks)
            new = vote(np.stack(stacked), scores)
            median = np.median(scores)
            crossed += int(np.count_nonzero((new > median) != (scores > median)))
            new_arrays[key] = Array(new)
        total = sum(scores.size for scores in self.current_arrays.values())
        return ArrayRecord(new_arrays), {"median-crossings": crossed / max(total, 1)}
