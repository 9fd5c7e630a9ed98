"""One graph per neuron layer: filters as nodes, edges between similarly connected filters.

Connection strength q_i[c] = ‖W_i[c,:,:]‖₁ (see features.connection_strength). Raw
cosines of non-negative vectors are all high, so the similarity is taken on q centred
by the layer mean, and ε is a quantile: an edge joins i and j when their cosine is
in the top (1 − ε) of the layer's pairs. Dormant filters (‖q‖₁ below δ × the layer
median) get no edges, so they cannot pull active neurons' embeddings around.
The premise (ONP.md): backdoor neurons connect to backdoor neurons, clean to clean.
"""
from __future__ import annotations

import torch
from torch_geometric.data import Data
from torch_geometric.nn.conv.gcn_conv import gcn_norm

from .context import ModelContext
from .features import NodeFeatures, connection_strength


def layer_edges(q: torch.Tensor, epsilon: float = 0.9, delta: float = 0.1, max_degree: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(edge_index [2, E], edge_weight [E]) for one layer's connection-strength matrix."""
    n = q.shape[0]
    if n < 2:
        return torch.zeros(2, 0, dtype=torch.long), torch.zeros(0)
    norms = q.sum(1)
    active = norms >= delta * norms.median()
    centred = q - q.mean(0, keepdim=True)
    unit = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = unit @ unit.t()
    cos.fill_diagonal_(-2.0)
    cos[~active] = -2.0
    cos[:, ~active] = -2.0
    valid = cos[cos > -2.0]
    if valid.numel() == 0:
        return torch.zeros(2, 0, dtype=torch.long), torch.zeros(0)
    threshold = torch.quantile(valid, epsilon) if valid.numel() > 1 else valid[0]
    k = min(max_degree, n - 1)
    top = cos.topk(k, dim=1)
    rows = torch.arange(n).unsqueeze(1).expand(-1, k)
    keep = top.values >= threshold
    src, dst, w = rows[keep], top.indices[keep], top.values[keep]
    # symmetrise
    edge_index = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], 1)
    weight = torch.cat([w, w]).clamp_min(0.0)
    if edge_index.numel():
        key = edge_index[0] * n + edge_index[1]
        key, first = torch.unique(key, return_inverse=True)
        w_u = torch.zeros(len(key)).scatter_reduce(0, first, weight, "amax", include_self=False)
        edge_index = torch.stack([key // n, key % n])
        weight = w_u
    return edge_index, weight


def layer_descriptor(ctx: ModelContext, index: int) -> torch.Tensor:
    """Depth (0..1), log width, kind and residual-group membership of a layer."""
    layers = ctx.neurons.layers
    layer = layers[index]
    return torch.tensor([
        index / max(1, len(layers) - 1),
        torch.log2(torch.tensor(float(layer.size))).item() / 10.0,
        1.0 if layer.kind == "bn" else 0.0,
        1.0 if layer.group >= 0 else 0.0,
    ])


DESCRIPTOR_SIZE = 4


def propagation_edges(edge_index: torch.Tensor, edge_weight: torch.Tensor, num_nodes: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The GCN's symmetric normalisation with self-loops, D^-1/2 (A + I) D^-1/2, computed once per graph.

    ``GCNConv(normalize=True)`` recomputes it on every call; the encoder runs each layer's graph
    thousands of times per repair (482 episodes and the imitation steps: 8184 calls, 1.3 s of the
    CIFAR-10 search in gcn_norm), so the encoder's convolutions take these edges with ``normalize=False``.
    """
    return gcn_norm(edge_index, edge_weight, num_nodes, add_self_loops=True)


def build_graphs(ctx: ModelContext, features: NodeFeatures, epsilon: float = 0.9, delta: float = 0.1) -> list[Data]:
    """A torch_geometric ``Data`` per neuron layer.

    x = node features, edge_index / edge_weight = the similarity edges, prop_index / prop_weight = the
    same edges normalised for the encoder (``propagation_edges``), desc = the layer descriptor.
    """
    graphs = []
    for i, layer in enumerate(ctx.neurons.layers):
        q = connection_strength(ctx, layer)
        edge_index, edge_weight = layer_edges(q, epsilon, delta)
        x, edge_weight = features.per_layer[i].float(), edge_weight.float()
        prop_index, prop_weight = propagation_edges(edge_index, edge_weight, len(x))
        graphs.append(Data(x=x, edge_index=edge_index, edge_weight=edge_weight, prop_index=prop_index,
                           prop_weight=prop_weight, desc=layer_descriptor(ctx, i), layer=i))
    return graphs
