"""FedLD's server rule: principal-gradient aggregation of client deltas, per tensor.

Paper: Zeng et al., "Tackling Data Heterogeneity in Federated Learning via Loss
Decomposition", MICCAI 2024 (arXiv 2408.12300). The server reduces the
"aggregation loss" term by replacing each client's update with its components
along the principal directions of all clients' updates, each scaled by the
client's update norm and the direction's share of the total variance. The
client half (margin-controlled local training) is `fedsim.clients.fedld`.
"""

from __future__ import annotations

import numpy as np

from fedsim.strategies.base import DeltaStrategy


def principal_directions(deltas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) of the Gram matrix G G^T / m and directions G^T e_j.

    `deltas` is G, the (m, d) matrix of client updates. The directions (rows of
    the returned (m, d) array) are the right singular vectors of G scaled by
    sqrt(m * s_j); the eigenvalues are s_j = sigma_j(G)^2 / m, clipped at 0.
    """
    m = deltas.shape[0]
    eigenvalues, eigenvectors = np.linalg.eigh(deltas @ deltas.T / m)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues = np.clip(eigenvalues[order], 0.0, None)
    directions = eigenvectors[:, order].T @ deltas
    return eigenvalues, directions


def majority_sign_flips(projections: np.ndarray) -> np.ndarray:
    """Per direction (column), True where fewer clients project >= 0 than < 0.

    `projections[i, j] = <d_i, w_j>`. A tie keeps the direction as it is.
    """
    non_negative = (projections >= 0).sum(axis=0)
    return non_negative < projections.shape[0] - non_negative


def num_directions(num_clients: int, k_proportion: float) -> int:
    """k = floor(k_proportion * m), at least 1 so a lone replier still moves the model."""
    return max(1, int(np.floor(k_proportion * num_clients)))


def principal_gradient_update(deltas: np.ndarray, k_proportion: float = 0.8) -> np.ndarray:
    """FedLD's layer update from the (m, d) matrix of client deltas.

    With s_j, w_j from `principal_directions` and k = floor(k_proportion * m):

        r_i = sum_{j<k} sign(<d_i, w_j>) * (s_j / sum_all s) * ||d_i|| * w_j / ||w_j||
        update = mean_i r_i

    Directions are sign-calibrated by majority first, as in the paper; note that
    r_i itself does not change when w_j flips. Directions whose eigenvalue or
    norm is numerically zero (rank-deficient layers) are skipped, so the result
    is always finite; all-zero deltas give a zero update.
    """
    deltas = np.asarray(deltas, dtype=np.float64)
    m, d = deltas.shape
    eigenvalues, directions = principal_directions(deltas)
    total = eigenvalues.sum()
    if total <= 0.0:
        return np.zeros(d)
    k = num_directions(m, k_proportion)
    eigenvalues, directions = eigenvalues[:k], directions[:k]
    norms = np.linalg.norm(directions, axis=1)
    tolerance = eigenvalues[0] * max(m, d) * np.finfo(np.float64).eps
    usable = (eigenvalues > tolerance) & (norms > 0.0)
    eigenvalues, directions, norms = eigenvalues[usable], directions[usable], norms[usable]

    projections = deltas @ directions.T  # (m, k)
    flips = majority_sign_flips(projections)
    directions[flips] *= -1.0
    projections[:, flips] *= -1.0

    client_norms = np.linalg.norm(deltas, axis=1)
    coefficients = np.sign(projections) * (eigenvalues / total) * client_norms[:, None]
    return coefficients.mean(axis=0) @ (directions / norms[:, None])


class FedLD(DeltaStrategy):
    """FedLD (Zeng et al., MICCAI 2024): principal-gradient aggregation of client deltas.

    Per state entry ("layer"): the unweighted mean of the deltas in round 1, for
    a layer whose history is all zeros, and for single-element entries;
    otherwise `principal_gradient_update`. After either branch the layer's
    history becomes `history_decay * history + (1 - history_decay) * update`;
    the history only decides which branch a layer takes. With partial
    participation the rule runs over the clients that replied. Sample counts
    are ignored, as in the reference. Pair it with the `fedld` trainer, which
    uploads deltas.

    Parameters
    ----------
    k_proportion : float (default: 0.8)
        Fraction of the m principal directions kept, k = floor(k_proportion * m).
    history_decay : float (default: 0.99)
        EMA factor of the per-layer update history.
    **kwargs
        FedAvg's sampling and record-key arguments.
    """

    def __init__(self, k_proportion: float = 0.8, history_decay: float = 0.99, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < k_proportion <= 1.0:
            raise ValueError(f"k_proportion must be in (0, 1] (got {k_proportion})")
        if not 0.0 <= history_decay < 1.0:
            raise ValueError(f"history_decay must be in [0, 1) (got {history_decay})")
        self.k_proportion = k_proportion
        self.history_decay = history_decay
        self.history: dict[str, np.ndarray] = {}

    def aggregate_deltas(
        self, server_round: int, deltas: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Principal-gradient (or mean) update per entry, then the history EMA."""
        update = {}
        for key, stacked in deltas.items():
            history = self.history.get(key)
            flat = stacked.reshape(stacked.shape[0], -1)
            if server_round == 1 or history is None or not history.any() or flat.shape[1] == 1:
                layer = flat.mean(axis=0)
            else:
                layer = principal_gradient_update(flat, self.k_proportion)
            layer = layer.reshape(stacked.shape[1:])
            base = history if history is not None else np.zeros_like(layer)
            self.history[key] = self.history_decay * base + (1.0 - self.history_decay) * layer
            update[key] = layer
        return update
