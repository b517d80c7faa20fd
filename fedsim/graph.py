"""k-NN graphs over a batch of samples, and the backprop GNN that learns on them.

fedsim's datasets carry no edge list, so graph methods treat samples as nodes and
link each to its nearest neighbours in feature space, over the nodes at hand (a
minibatch in training, the evaluated batch at inference). `KNNGraphNet` is the
backprop baseline for ForwardGNN (`fedsim.clients.forward_gnn`): the same
convolutions over the same graph, trained end to end through a linear head by
any backprop trainer (`client=sgd`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch_geometric.nn import GCNConv, SAGEConv

from fedsim.errors import ConfigError

#: model.conv -> the layer class: SAGE with mean aggregation, or GCN.
CONVS = {"sage": lambda n_in, n_out: SAGEConv(n_in, n_out, aggr="mean"), "gcn": GCNConv}


def knn_graph(x: torch.Tensor, k: int) -> torch.Tensor:
    """Edges (2, E) of the symmetric k-NN graph over the rows of `x` (N, F), no self loops.

    Each node links to its k nearest others in Euclidean distance (ties go to the
    lower index), and every link goes both ways; the edges come sorted by (source,
    target). k is capped at N - 1.
    """
    n = x.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return torch.zeros(2, 0, dtype=torch.long, device=x.device)
    dist = torch.cdist(x.flatten(1).float(), x.flatten(1).float())
    dist.fill_diagonal_(math.inf)
    nearest = torch.sort(dist, dim=1, stable=True).indices[:, :k]  # (N, k)
    source = torch.arange(n, device=x.device).repeat_interleave(k)
    target = nearest.reshape(-1)
    codes = torch.cat([source * n + target, target * n + source]).unique()  # sorted
    return torch.stack([codes // n, codes % n])


def check_gnn_layers(conv: str, hidden: Sequence[int]) -> None:
    """`model.conv` is a known layer and `model.hidden` a non-empty list of widths."""
    if conv not in CONVS:
        raise ConfigError(f"model.conv must be one of {sorted(CONVS)} (got {conv!r})")
    if not hidden or not all(isinstance(w, int) and w >= 1 for w in hidden):
        raise ConfigError(
            f"model.hidden must be a non-empty list of integers >= 1 (got {list(hidden)})"
        )


class KNNGraphNet(nn.Module):
    """GNN layers over the k-NN graph of a batch, then a linear head; trained by backprop.

    `forward(x)` flattens the (B, *input_shape) batch, links each node to its `k`
    nearest others (`knn_graph`), applies ReLU(conv(h, edges)) per layer and returns
    (B, C) logits. As for ForwardGNN, a node's prediction depends on the nodes
    evaluated with it (the batch is its graph). With `k = 0` there are no edges: the
    same layers on each node alone (a SAGE layer then reduces to its root weight), the
    "no graph" ablation. ForwardGNN's layers are the same convolutions, but each reads
    the previous output detached and L2-normalized; here gradients flow end to end.

    Parameters
    ----------
    input_shape, num_classes : the dataset's sample shape (flattened) and class count.
    hidden : widths of the GNN layers.
    k : neighbours per node (0: no edges).
    conv : "sage" (SAGEConv, mean aggregation) or "gcn" (GCNConv).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (128, 128, 128, 128),
        k: int = 10,
        conv: str = "sage",
    ) -> None:
        super().__init__()
        check_gnn_layers(conv, hidden)
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 0):
            raise ConfigError(f"model.k must be an integer >= 0 (got {k})")
        self.k = k
        widths = [math.prod(input_shape), *hidden]
        self.convs = nn.ModuleList(
            CONVS[conv](n_in, n_out) for n_in, n_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) for the nodes of `x`, over their own k-NN graph."""
        h = x.flatten(1)
        edges = knn_graph(h, self.k)
        for conv in self.convs:
            h = F.relu(conv(h, edges))
        return self.head(h)
