"""Per-neuron effects of pruning: how much the backdoor score and clean accuracy move.

The most direct trigger-free evidence for a neuron is what happens when it alone is
pruned: does the synthesised-trigger target probability fall (it carries the
shortcut) and does clean accuracy hold (it carries little else)? Exact leave-one-out
is one forward per neuron (from the neuron's own layer on), so it is done for the
``limit`` neurons a first-order (Taylor) estimate ranks highest; the rest keep their
Taylor estimate, which one backward pass gives for all neurons. Measured on the
Fashion-MNIST BadNets subject: the top leave-one-out neuron alone took the real ASR
from 99.8% to 17% (docs/ONP.md).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .context import Batch, ModelContext
from .synth import TriggerSet, triggered_images


@dataclass
class NeuronEffects:
    backdoor_drop: torch.Tensor  # [total] fall of the weighted target probability when pruned alone
    loss_rise: torch.Tensor  # [total] rise of the clean cross-entropy when pruned alone
    exact: torch.Tensor  # [total] bool: leave-one-out measured (True) or Taylor estimate (False)


def strong_suspect_images(triggers: TriggerSet, batch: Batch, limit: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images carrying each strong suspect's trigger, their suspect class, and per-image weights.

    A suspect's weight is spread over its images, so the weighted sum of target
    probabilities is the reward's backdoor score restricted to the strong suspects.
    """
    top = float(triggers.weights.max()) if len(triggers.weights) else 0.0
    # faint suspects cost forwards and add little
    strong = [k for k in triggers.suspects if triggers.weights[k] >= 0.25 * top]
    x, owner = triggered_images(triggers, batch, strong, limit)
    counts = torch.bincount(owner, minlength=len(triggers.weights)).clamp_min(1).to(owner.device)
    weights = triggers.weights.to(owner.device)[owner] / counts[owner]
    return x, owner, weights


def _taylor(ctx: ModelContext, x_clean: torch.Tensor, y_clean: torch.Tensor, x_trig: torch.Tensor,
            t_trig: torch.Tensor, w_trig: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order estimates: pruning neuron i changes f by about −∂f/∂m_i at m = 1."""
    mask = torch.ones(ctx.total, device=ctx.device, requires_grad=True)
    ctx.net.set_masks(ctx.split_flat(mask))
    try:
        loss = F.cross_entropy(ctx.net(x_clean), y_clean)
        g_loss, = torch.autograd.grad(loss, mask)
        g_b = torch.zeros_like(g_loss)
        if len(x_trig):
            prob = ctx.net(x_trig).softmax(1).gather(1, t_trig[:, None]).squeeze(1)
            g_b, = torch.autograd.grad((prob * w_trig).sum(), mask)
    finally:
        ctx.net.set_masks(None)
    return g_b.detach(), -g_loss.detach()  # drop of B ≈ +∂B/∂m; rise of loss ≈ −∂L/∂m


@torch.no_grad()
def _leave_one_out(ctx: ModelContext, neurons: torch.Tensor, x: torch.Tensor,
                   fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """[fn(logits [n, K]) for each neuron i], the logits of the images ``x`` with neuron i alone pruned.

    Each mask runs only the graph from its neuron's layer on (``PrefixCache``): the layers before
    it are computed once per layer for all its neurons. On the small CNN that is a third of the
    FLOPs of a full forward per neuron (docs/ONP.md, Speed).
    """
    cache = ctx.prefix_cache(x)
    mask = torch.ones(ctx.total, device=ctx.device)
    out = []
    for i in neurons.tolist():
        mask[i] = 0
        out.append(fn(cache.logits(mask)))
        mask[i] = 1
    return torch.stack(out) if out else torch.zeros(0, device=ctx.device)


def neuron_effects(ctx: ModelContext, triggers: TriggerSet, batch: Batch, limit: int = 256,
                   images: int = 128) -> NeuronEffects:
    """Leave-one-out effects for the top-``limit`` Taylor suspects, Taylor elsewhere."""
    x_clean, y_clean = batch.x[:images], batch.y[:images]
    x_trig, t_trig, w_trig = strong_suspect_images(triggers, batch, images)
    drop, rise = _taylor(ctx, x_clean, y_clean, x_trig, t_trig, w_trig)
    exact = torch.zeros(ctx.total, dtype=torch.bool)
    if limit > 0:
        chosen = drop.argsort(descending=True)[:min(limit, ctx.total)]
        with torch.no_grad():
            def clean_loss(logits: torch.Tensor) -> torch.Tensor:
                return F.cross_entropy(logits, y_clean)

            def backdoor_score(logits: torch.Tensor) -> torch.Tensor:  # weighted target probability
                return (logits.softmax(1).gather(1, t_trig[:, None]).squeeze(1) * w_trig).sum()

            rise[chosen] = _leave_one_out(ctx, chosen, x_clean, clean_loss) - clean_loss(ctx.logits(None, x_clean))
            if len(x_trig):
                drop[chosen] = (backdoor_score(ctx.logits(None, x_trig))
                                - _leave_one_out(ctx, chosen, x_trig, backdoor_score))
        exact[chosen.cpu()] = True
    return NeuronEffects(drop.cpu(), rise.cpu(), exact)
