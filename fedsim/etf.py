"""SSE-C, FedLoGe's frozen classifier: a sparse simplex equiangular tight frame (ETF).

Pure functions of the seed and sizes, so every party (each client, and the server
when it scores backbone + SSE-C) builds the same matrix without communicating it.
Used by `fedsim.clients.fedloge` (training) and `fedsim.strategies.fedloge`
(evaluation).
"""

from __future__ import annotations

import math

import torch


def dense_etf(feature_dim: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A (d, K) simplex ETF: sqrt(K/(K-1)) * P (I - 11^T/K), P with orthonormal columns.

    Columns have unit norm and pairwise cosine -1/(K-1). Needs d >= K.
    """
    if feature_dim < num_classes:
        raise ValueError(
            f"an equiangular tight frame needs feature dimension >= classes "
            f"(got {feature_dim} < {num_classes})"
        )
    gaussian = torch.randn(feature_dim, num_classes, generator=generator, dtype=torch.float64)
    basis, _ = torch.linalg.qr(gaussian)
    centering = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    return math.sqrt(num_classes / (num_classes - 1)) * basis @ centering


def nearest_cosines(matrix: torch.Tensor) -> torch.Tensor:
    """For every column, its largest cosine with another column (nearest neighbour)."""
    unit = matrix / matrix.norm(dim=0, keepdim=True)
    cosines = unit.T @ unit
    cosines = cosines - 3.0 * torch.eye(len(cosines), dtype=cosines.dtype)  # exclude self
    return cosines.max(dim=1).values


def etf_objective(matrix: torch.Tensor, norm: float) -> torch.Tensor:
    """SSE-C's refinement loss: class-vector norms to `norm`, nearest angle maximized.

    sum_c (||m_c|| - norm)^2 - mean_c arccos(max_{c' != c} cos(m_c, m_c')).
    """
    norm_term = (matrix.norm(dim=0) - norm).pow(2).sum()
    angle_term = torch.arccos(nearest_cosines(matrix).clamp(-0.99999, 0.99999)).mean()
    return norm_term - angle_term


def sparse_etf(
    feature_dim: int,
    num_classes: int,
    seed: int,
    sparsity: float = 0.6,
    norm: float = 0.1,
    steps: int = 2000,
    lr: float = 1e-3,
) -> torch.Tensor:
    """SSE-C: a dense ETF with `sparsity` of its d*K entries zeroed, then refined.

    The zeroed entries are drawn uniformly over the flattened matrix; the others
    are refined with Adam on `etf_objective` (zeros stay zero), its lr annealed
    to 0 by a cosine. 2000 steps at lr 1e-3 reach the dense ETF's nearest angle
    (the reference runs 10,000 constant steps at 1e-4, slightly short of it). Deterministic in
    `seed`, so every party builds the same matrix without communicating it.
    Returns a float32 (d, K) matrix, one column per class.
    """
    generator = torch.Generator().manual_seed(seed)
    etf = dense_etf(feature_dim, num_classes, generator)
    num_zero = int(sparsity * feature_dim * num_classes)
    zeroed = torch.randperm(feature_dim * num_classes, generator=generator)[:num_zero]
    keep = torch.ones(feature_dim * num_classes, dtype=torch.float64)
    keep[zeroed] = 0.0
    keep = keep.view(feature_dim, num_classes)
    values = (etf * keep).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([values], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        etf_objective(values * keep, norm).backward()
        optimizer.step()
        schedule.step()
    return (values.detach() * keep).float()
