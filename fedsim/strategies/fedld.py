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

from fedsim.errors import is_number, require
from fedsim.strategies.base import DeltaStrategy, global_norm


def gram_eigen(gram: np.ndarray, num_clients: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues s (descending, clipped at 0) and eigenvectors E of G G^T / m.

    `gram` is G G^T for G the (m, d) matrix of client updates. The principal
    directions are w_j = G^T e_j, the right singular vectors of G scaled by
    ||w_j|| = sqrt(m * s_j); s_j = sigma_j(G)^2 / m.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(gram / num_clients)
    order = np.argsort(eigenvalues)[::-1]
    return np.clip(eigenvalues[order], 0.0, None), eigenvectors[:, order]


def majority_sign_flips(projections: np.ndarray) -> np.ndarray:
    """Per direction (column), True where fewer clients project >= 0 than < 0.

    `projections[i, j] = <d_i, w_j>`. A tie keeps the direction as it is.
    """
    non_negative = (projections >= 0).sum(axis=0)
    return non_negative < projections.shape[0] - non_negative


def num_directions(num_clients: int, k_proportion: float) -> int:
    """k = floor(k_proportion * m), at least 1 so a lone replier still moves the model.

    A hair is added before flooring so that 0.7 * 90 (62.99999...) gives 63.
    """
    return max(1, int(np.floor(k_proportion * num_clients + 1e-9)))


def rounding_level_cosines(
    num_clients: int, eigenvalues: np.ndarray
) -> np.ndarray:
    """Per direction, the |cos(d_i, w_j)| that rounding error alone can produce.

    Computed eigenvectors carry errors of about m * eps * s_1 / s_j relative to
    their entries (their accuracy degrades with the eigenvalue gap); the cosine
    of a client with direction j inherits about the square root of that ratio.
    A projection below this level has no reliable sign, so it counts as 0.
    """
    eps = np.finfo(np.float64).eps
    return 16.0 * num_clients * eps * np.sqrt(eigenvalues[0] / eigenvalues)


def principal_gradient_update(deltas: np.ndarray, k_proportion: float = 0.8) -> np.ndarray:
    """FedLD's layer update from the (m, d) matrix of client deltas.

    With s_j, w_j = G^T e_j from `gram_eigen` and k = floor(k_proportion * m):

        r_i = sum_{j<k} sign(<d_i, w_j>) * (s_j / sum_all s) * ||d_i|| * w_j / ||w_j||
        update = mean_i r_i

    Directions are sign-calibrated by majority first, as in the paper (r_i itself
    does not change when w_j flips). Directions whose eigenvalue is numerically
    zero (rank-deficient layers) are skipped, so the result is always finite, and
    all-zero deltas give a zero update. A client orthogonal to a direction up to
    rounding error adds nothing along it (sign 0), rather than a sign set by noise.

    Computed from the m x m Gram matrix: <d_i, w_j> = m s_j E_ij, ||w_j|| =
    sqrt(m s_j), ||d_i||^2 = (G G^T)_ii, and sum_j c_j w_j / ||w_j|| =
    G^T (E (c / ||w||)), so G is read twice (Gram, final product) instead of
    forming the k directions.
    """
    deltas = np.asarray(deltas, dtype=np.float64)
    m, d = deltas.shape
    gram = deltas @ deltas.T
    eigenvalues, eigenvectors = gram_eigen(gram, m)
    total = eigenvalues.sum()
    if total <= 0.0:
        return np.zeros(d)
    k = num_directions(m, k_proportion)
    eigenvalues, eigenvectors = eigenvalues[:k], eigenvectors[:, :k]
    usable = eigenvalues > eigenvalues[0] * max(m, d) * np.finfo(np.float64).eps
    eigenvalues, eigenvectors = eigenvalues[usable], eigenvectors[:, usable]

    direction_norms = np.sqrt(m * eigenvalues)
    client_norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    projections = eigenvectors * (m * eigenvalues)  # (m, k): <d_i, w_j>
    scale = np.maximum(client_norms[:, None] * direction_norms, np.finfo(np.float64).tiny)
    cosines = projections / scale
    projections[np.abs(cosines) < rounding_level_cosines(m, eigenvalues)] = 0.0
    flips = majority_sign_flips(projections)
    eigenvectors[:, flips] *= -1.0
    projections[:, flips] *= -1.0

    coefficients = np.sign(projections) * (eigenvalues / total) * client_norms[:, None]
    return (eigenvectors @ (coefficients.mean(axis=0) / direction_norms)) @ deltas


class FedLD(DeltaStrategy):
    """FedLD (Zeng et al., MICCAI 2024): principal-gradient aggregation of client deltas.

    Per state entry ("layer"): the unweighted mean of the deltas the first round
    the layer is aggregated (round 1), while the layer's history is all zeros, and
    for single-element entries (where the rule equals the mean anyway); otherwise
    `principal_gradient_update`. After either branch the layer's
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
    principal_gradient : bool (default: True)
        False always takes the mean branch: an ablation that keeps FedLD's client
        (margin loss) and drops its server rule.
    match_mean_norm : bool (default: False)
        Rescale the whole update to the length of the plain mean of the deltas: an
        ablation that keeps the rule's direction and restores averaging's step length.
    **kwargs
        FedAvg's sampling and record-key arguments.
    """

    def __init__(
        self,
        k_proportion: float = 0.8,
        history_decay: float = 0.99,
        principal_gradient: bool = True,
        match_mean_norm: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        require(is_number(k_proportion) and 0 < k_proportion <= 1, "strategy.k_proportion",
                "a number in (0, 1]", k_proportion)
        require(is_number(history_decay) and 0 <= history_decay < 1, "strategy.history_decay",
                "a number in [0, 1)", history_decay)
        for name, value in (("principal_gradient", principal_gradient),
                            ("match_mean_norm", match_mean_norm)):
            require(isinstance(value, bool), f"strategy.{name}", "true or false", value)
        self.k_proportion = k_proportion
        self.history_decay = history_decay
        self.principal_gradient = principal_gradient
        self.match_mean_norm = match_mean_norm
        self.history: dict[str, np.ndarray] = {}

    def aggregate_deltas(
        self, server_round: int, deltas: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Principal-gradient (or mean) update per entry, then the history EMA."""
        update = {}
        for key, stacked in deltas.items():
            history = self.history.get(key)
            flat = stacked.reshape(stacked.shape[0], -1)
            if not self.principal_gradient or history is None or not history.any() \
                    or flat.shape[1] == 1:
                layer = flat.mean(axis=0)
            else:
                layer = principal_gradient_update(flat, self.k_proportion)
            layer = layer.reshape(stacked.shape[1:])
            base = history if history is not None else np.zeros_like(layer)
            self.history[key] = self.history_decay * base + (1.0 - self.history_decay) * layer
            update[key] = layer
        if self.match_mean_norm:
            update = with_norm(update, global_norm(d.mean(axis=0) for d in deltas.values()))
        return update


def with_norm(update: dict[str, np.ndarray], norm: float) -> dict[str, np.ndarray]:
    """`update` scaled to global L2 norm `norm` (unchanged if it is zero)."""
    length = global_norm(update.values())
    return update if length == 0 else {key: v * (norm / length) for key, v in update.items()}
