"""The dormant sweep: prune the neurons clean data barely uses, within a small budget of changed predictions.

Fine-Pruning's observation (Liu, Dolan-Gavitt & Garg 2018) is that a backdoor's neurons sit
nearly silent on clean inputs: the trigger is what wakes them. ONP's search only acts on a
backdoor some synthesised trigger exposes, and some planted triggers are never exposed
(CIFAR-10 SIG: no family's cost singles out its target, docs/ONP.md §1h–§1q). The sweep is
the trigger-free complement. In every neuron layer, neurons whose mean clean activation is
below ``alpha`` × the layer's mean are candidates; least active first (relative to their
layer), each is pruned if the clean predictions changed so far — against the model the
sweep started from — stay within ``budget``. A neuron the clean data does not use costs
nothing to remove on that data, which is all the sweep can know; the budget bounds what it
may cost beyond it. ``per_layer`` keeps only each layer's few least active candidates: the
planted neurons measured so far were among the two quietest of their layer, while a network
without BN can hold dozens of dead ReLU units under the bar that are no evidence of anything
(session 23, docs/ONP.md §1v).

Measured on this project's subjects (docs/ONP.md §1u): the CIFAR-10 SIG backdoor lives in
the least active channel of the fifth neuron layer (0.32–0.35 × its layer's mean), and
pruning it alone changes 0.4% of clean predictions and takes the ASR from 91% to 0.6%.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .context import Batch, ModelContext


@dataclass
class SweepResult:
    keep: torch.Tensor  # flat keep-mask: 0 for the neurons the sweep prunes
    pruned: list[int] = field(default_factory=list)  # flat indices, in the order they were accepted
    flips: float = 0.0  # share of clean predictions changed by the accepted set
    candidates: int = 0  # neurons below the activation bar that were tried


@torch.no_grad()
def relative_activation(ctx: ModelContext, batch: Batch, chunk: int | None = None) -> torch.Tensor:
    """Flat [total]: each neuron's mean clean activation after a ReLU, over its layer's mean.

    After the ReLU, as the next layer reads it (a large negative pre-activation is as silent
    as zero). Neurons already pruned (all zero) are left out of their layer's mean and get 0.
    """
    chunk = chunk or ctx.images_per_forward(250)
    sums = [torch.zeros(s) for s in ctx.sizes]
    for i in range(0, len(batch.x), chunk):
        _, acts = ctx.net.forward_with_activations(batch.x[i:i + chunk])
        for li, a in enumerate(acts):
            dims = [0] + list(range(2, a.ndim))
            sums[li] += a.float().relu().mean(dims).cpu() * len(a)
    out = []
    for s in sums:
        live = s[s > 0]
        out.append(s / live.mean() if len(live) else torch.zeros_like(s))
    return torch.cat(out)


@torch.no_grad()
def dormant_sweep(ctx: ModelContext, batch: Batch, alpha: float, budget: float, max_candidates: int = 64,
                  per_layer: int | None = None) -> SweepResult:
    """Greedy, least active first: prune each candidate while the changed predictions stay within ``budget``.

    ``per_layer`` keeps only each layer's that many least active neurons as candidates (None: no limit).
    """
    keep = torch.ones(ctx.total)
    if budget <= 0 or alpha <= 0 or len(batch.x) == 0:
        return SweepResult(keep)
    rel = relative_activation(ctx, batch)
    live = rel > 0  # a neuron already silent everywhere (pruned) has nothing to remove
    below = live & (rel < alpha)
    if per_layer is not None:
        allowed = torch.zeros_like(below)
        for lo, hi in zip(ctx.offsets[:-1], ctx.offsets[1:]):
            idx = torch.nonzero(below[lo:hi]).flatten() + lo
            allowed[idx[rel[idx].argsort()[:per_layer]]] = True
        below = allowed
    order = [i for i in rel.argsort().tolist() if below[i]][:max_candidates]
    cache = ctx.prefix_cache(batch.x)
    reference = cache.logits(keep).argmax(1)
    result = SweepResult(keep, candidates=len(order))
    for i in order:
        trial = keep.clone()
        trial[i] = 0
        flips = float((cache.logits(trial).argmax(1) != reference).float().mean())
        if flips <= budget:
            keep, result.flips = trial, flips
            result.pruned.append(i)
    result.keep = keep
    return result
