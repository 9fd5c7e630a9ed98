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
        logits, value = policy(g.x, g.prop_index, g.prop_weight, g.desc, context)
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


def prior_probabilities(backdoor_drop: torch.Tensor, joint: torch.Tensor | None = None, top: float = 0.5,
                        floor_count: float = 0.5) -> torch.Tensor:
    """Per-neuron prune probabilities the policy starts from, before any reward is seen.

    ∝ the squared, max-scaled leave-one-out backdoor drop: the few neurons whose removal
    alone cuts the synthesised trigger start near ``top``, the rest near
    ``floor_count / N``. Measured (docs/ONP.md): from a uniform start the agent sampled
    the one decisive neuron of a 224-neuron CNN about twice in 240 episodes and never
    learned it; the search decides *which combination*, the prior only says where to look.
    ``joint`` (scores in [0, 1], ``joint.py``) raises each neuron's scaled drop to its joint score where
    that is higher (the ``joint_mask`` option, docs/ONP.md §1p).
    """
    drop = backdoor_drop.clamp_min(0)
    scaled = drop / drop.max().clamp_min(1e-12)
    if joint is not None:
        scaled = torch.maximum(scaled, joint)
        scaled = scaled / scaled.max().clamp_min(1e-12)  # a no-op unless every drop is ≤ 0
    return (top * scaled ** 2).clamp_min(floor_count / max(1, drop.numel())).clamp(max=top)


def imitate(policy: PolicyValueNet, graphs: list[Data], prior: torch.Tensor, steps: int = 100,
            lr: float = 0.01) -> float:
    """Behaviour cloning: fit the policy's prune probabilities to ``prior`` (BCE); returns the final loss."""
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    total = prior.numel()
    targets, contexts, offset, cum = [], [], 0, 0.0
    prev = 0.0
    for g in graphs:
        n = g.x.shape[0]
        t = prior[offset:offset + n]
        targets.append(t)
        contexts.append(torch.tensor([cum / total, prev]))
        cum += float(t.sum())
        prev = float(t.mean())
        offset += n
    loss_value = float("nan")
    for _ in range(steps):
        loss = torch.zeros(())
        for g, t, c in zip(graphs, targets, contexts):
            logits, _ = policy(g.x, g.prop_index, g.prop_weight, g.desc, c)
            loss = loss + F.binary_cross_entropy_with_logits(logits, t, reduction="sum")
        loss = loss / total
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
    return loss_value
