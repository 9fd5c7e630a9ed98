"""Policy-gradient agent: episodes walk the layers, each step decides a layer's prune set.

REINFORCE with a learned value baseline (advantage = return − V(state)) and an
entropy bonus. The reward arrives once, after the last layer, when the accumulated
mask is evaluated; the per-step value estimates let earlier layers' decisions be
credited against what was expected at that point of the episode.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch_geometric.data import Data

from .gnn import PolicyValueNet


@dataclass
class Episode:
    keep: torch.Tensor  # flat keep-mask (1 keep, 0 prune)
    log_prob: torch.Tensor  # [layers]
    entropy: torch.Tensor  # [layers]
    values: torch.Tensor  # [layers]


def run_episode(policy: PolicyValueNet, graphs: list[Data], total: int, generator: torch.Generator | None,
                greedy: bool = False) -> Episode:
    actions, log_probs, entropies, values = [], [], [], []
    pruned_so_far, prev_frac = 0, 0.0
    for g in graphs:
        context = torch.tensor([pruned_so_far / total, prev_frac])
        logits, value = policy(g.x, g.edge_index, g.edge_weight, g.desc, context)
        probs = torch.sigmoid(logits)
        if greedy:
            a = (probs > 0.5).float()
        else:
            a = torch.bernoulli(probs.detach(), generator=generator)
        log_probs.append((a * F.logsigmoid(logits) + (1 - a) * F.logsigmoid(-logits)).sum())
        entropies.append(-(probs * F.logsigmoid(logits) + (1 - probs) * F.logsigmoid(-logits)).sum())
        values.append(value)
        actions.append(a)
        pruned_so_far += int(a.sum())
        prev_frac = float(a.mean())
    prune = torch.cat(actions)
    return Episode(1 - prune.detach(), torch.stack(log_probs), torch.stack(entropies), torch.stack(values))


def policy_loss(episodes: list[Episode], returns: torch.Tensor, entropy_coef: float, value_coef: float) -> torch.Tensor:
    """REINFORCE with baseline; returns are standardised across the batch of episodes."""
    scale = returns.std() if len(returns) > 1 and returns.std() > 1e-8 else torch.tensor(1.0)
    norm = (returns - returns.mean()) / scale
    loss = torch.zeros(())
    for ep, r in zip(episodes, norm):
        advantage = r - ep.values.detach()
        loss = loss - (advantage * ep.log_prob).sum() + value_coef * ((ep.values - r) ** 2).sum()
        loss = loss - entropy_coef * ep.entropy.sum() / max(1, ep.keep.numel()) * len(ep.values)
    return loss / len(episodes)
