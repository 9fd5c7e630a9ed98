"""The policy/value network: a GNN encoder shared by every layer's graph.

Message passing lets a neuron's prune decision depend on the neurons it is
connected to (backdoor neurons cluster). The layer descriptor and the episode's
running context (how much has been pruned so far) are appended to every node, so one
set of weights serves all layers and all architectures.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch_geometric.nn import GCNConv

from .graph import DESCRIPTOR_SIZE

CONTEXT_SIZE = 2  # fraction pruned so far in the episode, fraction pruned in the previous layer


class PolicyValueNet(nn.Module):
    def __init__(self, num_features: int, hidden: int = 32, layers: int = 2, use_graph: bool = True,
                 initial_prune_prob: float = 0.01):
        super().__init__()
        self.use_graph = use_graph
        inp = num_features + DESCRIPTOR_SIZE + CONTEXT_SIZE
        self.inp = nn.Linear(inp, hidden)
        # the edges arrive normalised with self-loops (``graph.propagation_edges``): once per graph, not per call
        self.convs = nn.ModuleList(GCNConv(hidden, hidden, add_self_loops=False, normalize=False) for _ in range(layers))
        self.mlps = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))  # the no-graph ablation
        self.prune_head = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.value_head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        with torch.no_grad():
            self.prune_head[-1].weight.mul_(0.1)
            self.prune_head[-1].bias.fill_(math.log(initial_prune_prob / (1 - initial_prune_prob)))
            # the value baseline starts at 0 (the standardised return's mean), not at a random offset
            self.value_head[-1].weight.zero_()
            self.value_head[-1].bias.zero_()

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor, desc: torch.Tensor,
                context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-node prune logits [N] and the state value (scalar); edges as ``graph.propagation_edges`` gives them."""
        n = x.shape[0]
        h0 = torch.cat([x, desc.expand(n, -1), context.expand(n, -1)], 1)
        h = torch.tanh(self.inp(h0))
        for conv, mlp in zip(self.convs, self.mlps):
            upd = conv(h, edge_index, edge_weight) if self.use_graph else mlp(h)
            h = torch.tanh(h + upd)
        pooled = torch.cat([h.mean(0), h.amax(0)])
        logits = self.prune_head(torch.cat([h, pooled.expand(n, -1)], 1)).squeeze(1)
        value = self.value_head(pooled.unsqueeze(0)).squeeze()
        return logits, value
