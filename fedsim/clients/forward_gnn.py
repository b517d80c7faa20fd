"""ForwardGNN single-forward (SF): each GNN layer learns on its own, forward only.

Paper: Park et al., ICLR 2024, "Forward Learning of Graph Neural Networks". SF adds
C virtual class nodes with fixed random features to the graph, linked to labelled
nodes of their class. Layer l takes the detached, row-normalized (L2) output of
layer l-1 (the raw features, also normalized, for l = 1) and computes ReLU(conv_l(., edges)); its
logits for a node are the dot products of the node's layer-l embedding with the C
class nodes' layer-l embeddings, and the cross-entropy of those logits updates
layer l alone. A prediction sums the layers' softmaxes.

How it fits fedsim, where samples are nodes and no edge list travels with the data:

- The graph is a k-NN graph over the node features (`knn_graph`), built over the
  nodes at hand: a client's minibatch of its own nodes in training (graph FL by
  node subsets: each client's graph is over its own partition), the evaluated batch
  at inference.
- Label leakage: a node linked to its own class node would see its label through
  the edge. Each training batch is split at random into anchor nodes, linked to
  their class node, and query nodes, on which the loss is computed. The links are
  one-way, anchor -> class node (the paper's code also offers both directions):
  no real node ever receives a message from a class node, so a node's embedding
  is the same function of the k-NN graph in training and at inference, and the
  labels of anchor neighbours cannot reach a query through deeper layers either.
- Inductive inference: at inference no node is labelled, so nothing links the
  class nodes. The model keeps, per layer, an exponential moving average of the
  class nodes' embeddings over training batches (buffers, like BatchNorm's running
  statistics; FedAvg averages them with the weights) and scores nodes against it.
- Simultaneous updates: the paper trains layer 1 to convergence, then layer 2, and
  so on; with a few local epochs per FL round every layer steps on every batch.

What is shared: the class-node features are a persistent buffer drawn from
`shared_generator(class_seed, "forward_gnn")`, identical for every party (and in
the state dict). Weights and moving averages are uploaded and averaged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fedsim.clients.local_learning import shared_generator
from fedsim.clients.sgd import SGDTrainer
from fedsim.errors import ConfigError
from fedsim.graph import CONVS, check_gnn_layers, knn_graph


def class_edges(y: torch.Tensor, anchor_mask: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Edges (2, A) from each anchor node to its class node (node `num_nodes + y`)."""
    anchors = anchor_mask.nonzero().reshape(-1)
    return torch.stack([anchors, num_nodes + y[anchors]])


def split_anchors(
    num_nodes: int, anchor_fraction: float, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchor mask, query mask): a random `anchor_fraction` of the nodes (at least one)
    are anchors, the rest (at least one, given two nodes) queries.

    Draws from torch's global RNG on the CPU, so a seeded run splits alike on any device.
    """
    count = min(max(round(anchor_fraction * num_nodes), 1), max(num_nodes - 1, 1))
    anchor = torch.zeros(num_nodes, dtype=torch.bool)
    anchor[torch.randperm(num_nodes)[:count]] = True
    anchor = anchor.to(device)
    return anchor, ~anchor


class ForwardGNN(nn.Module):
    """The SF network over a k-NN graph of the nodes in a batch; see the module docstring.

    `forward(x)` (inference) takes a (B, *input_shape) batch of nodes, builds the
    k-NN graph over it, runs the layers (each on the detached, row-normalized output
    of the previous one) and scores each node's layer-l embedding against the
    moving average of the class nodes' layer-l embeddings. It returns the log of the
    mean of the layers' softmaxes (B, C): a normalized log-probability, usable as
    logits.

    Parameters
    ----------
    input_shape, num_classes : the dataset's sample shape (flattened) and class count.
    hidden : widths of the GNN layers (each one trained on its own loss).
    k : neighbours per node in the k-NN graph.
    class_seed : seed of the class nodes' fixed random features (shared by every party).
    conv : "sage" (SAGEConv, mean aggregation) or "gcn" (GCNConv).
    temperature : logits are dot products divided by it.
    ema_momentum : weight of a batch's class-node embeddings in the moving average.
    """

    trained_by = "fedsim.clients.forward_gnn.ForwardGNNTrainer"

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (128, 128, 128, 128),
        k: int = 10,
        class_seed: int = 0,
        conv: str = "sage",
        temperature: float = 0.1,
        ema_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        check_gnn_layers(conv, hidden)
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            raise ConfigError(f"model.k must be an integer >= 1 (got {k})")
        if not (isinstance(temperature, int | float) and temperature > 0):
            raise ConfigError(f"model.temperature must be a number > 0 (got {temperature})")
        if not (isinstance(ema_momentum, int | float) and 0.0 < ema_momentum <= 1.0):
            raise ConfigError(f"model.ema_momentum must be a number in (0, 1] (got {ema_momentum})")
        num_features = math.prod(input_shape)
        self.num_classes = num_classes
        self.k = k
        self.temperature = temperature
        self.ema_momentum = ema_momentum
        widths = [num_features, *hidden]
        self.convs = nn.ModuleList(
            CONVS[conv](n_in, n_out) for n_in, n_out in zip(widths[:-1], widths[1:], strict=True)
        )
        features = torch.randn(
            num_classes, num_features, generator=shared_generator(class_seed, "forward_gnn")
        )
        self.register_buffer("class_features", features)
        # before any training: the class nodes' embeddings with no node linked to them
        with torch.no_grad():
            lone = features
            no_edges = torch.zeros(2, 0, dtype=torch.long)
            for index in range(len(self.convs)):
                lone = self.layer(index, lone, no_edges)
                self.register_buffer(f"class_embedding_{index}", lone.clone())

    def layer(self, index: int, h: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Layer `index` on the previous output `h`, detached and row-normalized."""
        return F.relu(self.convs[index](F.normalize(h.detach(), dim=1), edge_index))

    def class_embedding(self, index: int) -> torch.Tensor:
        """The moving average of the class nodes' embeddings at layer `index` (C, n_index)."""
        return getattr(self, f"class_embedding_{index}")

    @torch.no_grad()
    def update_class_embedding(
        self, index: int, embedding: torch.Tensor, present: torch.Tensor
    ) -> None:
        """Moves layer `index`'s average toward `embedding` for the classes in `present`."""
        average = self.class_embedding(index)
        average[present] = torch.lerp(average[present], embedding.detach()[present],
                                      self.ema_momentum)

    def scores(self, nodes: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Logits (N, C): node embeddings dotted with class embeddings, over the temperature."""
        return nodes @ classes.T / self.temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the layers' mean softmax for the nodes of `x`, over their own k-NN graph.

        The graph is built over the batch given, so a node's prediction depends on
        which nodes are evaluated with it (the evaluation batch size, a client's
        test split); no label is used.
        """
        x = x.flatten(1)
        probs = [logits.softmax(dim=1)
                 for logits, _ in layer_logits(self, x, knn_graph(x, self.k))]
        return torch.log(torch.stack(probs).mean(dim=0).clamp_min(1e-12))


def layer_logits(
    model: ForwardGNN,
    x: torch.Tensor,
    edge_index: torch.Tensor,
    y: torch.Tensor | None = None,
    anchor_mask: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (node logits (N, C), class-node embeddings (C, n_l)).

    With labels `y` and `anchor_mask`, the C class nodes join the graph (features
    `model.class_features`, an edge from each anchor to its class node) and the
    logits score against their embeddings in this graph (training, or transductive
    use); without, against the model's moving averages (inference). Each layer's
    input is the previous layer's output detached, so a caller may backpropagate
    one layer's loss before asking for the next.
    """
    x = x.flatten(1)
    num_nodes = x.shape[0]
    linked = y is not None
    if linked:
        if anchor_mask is None:
            raise ValueError("layer_logits: labels need an anchor mask")
        h = torch.cat([x, model.class_features.to(x.dtype)])
        edge_index = torch.cat([edge_index, class_edges(y, anchor_mask, num_nodes)], dim=1)
    else:
        h = x
    for index in range(len(model.convs)):
        h = model.layer(index, h, edge_index)
        classes = h[num_nodes:] if linked else model.class_embedding(index)
        yield model.scores(h[:num_nodes], classes), classes


def layer_losses(
    model: ForwardGNN,
    x: torch.Tensor,
    edge_index: torch.Tensor,
    y: torch.Tensor,
    anchor_mask: torch.Tensor,
    query_mask: torch.Tensor,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (cross-entropy on the query nodes, class-node embeddings).

    Class nodes are linked to the anchor nodes; backpropagate each loss before asking
    for the next (only one layer's graph is alive at a time).
    """
    for logits, classes in layer_logits(model, x, edge_index, y, anchor_mask):
        yield F.cross_entropy(logits[query_mask], y[query_mask]), classes


def summed_softmax(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Predicted classes from per-layer logits: argmax of the sum of their softmaxes."""
    return torch.stack([z.softmax(dim=1) for z in logits]).sum(dim=0).argmax(dim=1)


class ForwardGNNTrainer(SGDTrainer):
    """ForwardGNN SF as a local procedure: every layer steps on every minibatch.

    A minibatch is a subgraph of the client's nodes: the k-NN graph over the batch,
    with the class nodes linked to a random `anchor_fraction` of it and the loss on
    the rest (see the module docstring). Each layer's loss is backpropagated as soon
    as it exists; the batch's class-node embeddings update the model's moving
    averages. One optimizer over all layers (no gradient crosses layers, so it is
    the paper's per-layer optimizer); other parameters are those of `SGDTrainer`.
    Uploads the trained weights and moving averages.
    """

    required_model = "fedsim.clients.forward_gnn.ForwardGNN"

    def __init__(
        self, model_fn: Callable[[], nn.Module], anchor_fraction: float = 0.5, **kwargs
    ) -> None:
        super().__init__(model_fn, **kwargs)
        if not (isinstance(anchor_fraction, int | float) and 0.0 < anchor_fraction < 1.0):
            raise ConfigError(
                f"client.anchor_fraction must be a number in (0, 1) (got {anchor_fraction})"
            )
        self.anchor_fraction = anchor_fraction

    def objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Backpropagates each layer's loss in turn; returns their sum, detached."""
        total = torch.zeros((), device=x.device)
        if len(y) < 2:  # no query node to learn from
            return total
        x = x.flatten(1)
        anchor, query = split_anchors(len(y), self.anchor_fraction, x.device)
        present = torch.zeros(model.num_classes, dtype=torch.bool, device=x.device)
        present[y[anchor]] = True
        steps = layer_losses(model, x, knn_graph(x, model.k), y, anchor, query)
        for index, (loss, classes) in enumerate(steps):
            loss.backward()
            total += loss.detach()
            model.update_class_embedding(index, classes, present)
        return total
