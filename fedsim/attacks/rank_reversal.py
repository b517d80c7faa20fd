"""Rank reversal on FRL (Mozaffari et al. 2023, Section 6): vote the honest consensus upside down.

The colluders rank their edges honestly, add up each edge's positions, and all
submit the edges in descending order of that sum: what they jointly find most
important goes first, where the server reads "least important".
"""

from __future__ import annotations

import numpy as np

from fedsim.attacks.base import Arrays, Attack
from fedsim.clients.base import UPLOADS_RANKINGS
from fedsim.strategies.frl import edge_positions


def reversed_consensus(rankings: np.ndarray) -> np.ndarray:
    """Edge ids by descending total position over `rankings` (rows: colluders).

    Equal totals keep edge-id order (a stable sort of the negated totals).
    """
    totals = edge_positions(rankings).sum(axis=0)
    return np.argsort(-totals, kind="stable").astype(rankings.dtype)


class RankReversal(Attack):
    """Every malicious client submits the reversed consensus ranking of the colluders."""

    targets = (UPLOADS_RANKINGS,)

    def craft(self, honest: list[Arrays], global_arrays: Arrays, num_malicious: int) -> Arrays:
        return {key: reversed_consensus(np.stack([h[key] for h in honest])) for key in honest[0]}
